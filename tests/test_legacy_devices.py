"""The 8250 UART, the i8042 and the power button, driven register by register."""

from stratovirt_py.record import replace

import pytest

from stratovirt_py.devices import i8042 as K
from stratovirt_py.devices import serial as S
from stratovirt_py.devices.power import PowerButton
from stratovirt_py.errors import SnapshotError
from stratovirt_py.migration import codec


class Uart:
    def __init__(self):
        self.out = bytearray()
        self.irq = []
        self.dev = S.Serial(self.out.extend, self.irq.append)

    def w(self, reg, value):
        self.dev.write(reg, bytes([value]))

    def r(self, reg):
        return self.dev.read(reg, 1)[0]


def test_output_and_thre_interrupt():
    u = Uart()
    u.w(S.IER, S.IER_THRE)                 # enabling THRE raises it at once
    assert u.irq == [1]
    assert u.r(S.IIR_FCR) & 0x0F == S.IIR_THRE
    assert u.irq == [1, 0]                 # reading IIR clears it
    u.w(S.DATA, ord("x"))
    assert bytes(u.out) == b"x" and u.irq == [1, 0, 1]
    assert u.r(S.LSR) & (S.LSR_THRE | S.LSR_TEMT) == S.LSR_THRE | S.LSR_TEMT


def test_input_fifo_and_rda_interrupt():
    u = Uart()
    u.w(S.IER, S.IER_RDA)
    assert u.irq == []
    u.dev.enqueue_input(b"ab")
    assert u.irq == [1] and u.r(S.LSR) & S.LSR_DR
    assert u.r(S.IIR_FCR) & 0x0F == S.IIR_RDA
    assert u.r(S.DATA) == ord("a") and u.r(S.DATA) == ord("b")
    assert not u.r(S.LSR) & S.LSR_DR and u.irq == [1, 0]


def test_divisor_latch_and_loopback():
    u = Uart()
    u.w(S.LCR, S.LCR_DLAB | 3)
    u.w(S.DATA, 0x01)
    u.w(S.IER, 0x02)
    assert (u.r(S.DATA), u.r(S.IER)) == (0x01, 0x02)
    u.w(S.LCR, 3)
    u.w(S.MCR, S.MCR_LOOP | S.MCR_RTS | S.MCR_OUT2)
    assert u.r(S.MSR) == S.MSR_CTS | S.MSR_DCD   # Linux's autoconfig checks this
    u.w(S.DATA, ord("z"))
    assert u.out == b"" and u.r(S.DATA) == ord("z")


def test_state_round_trip():
    u = Uart()
    u.w(S.LCR, 0x03)
    u.w(S.IER, S.IER_RDA | S.IER_THRE)
    u.w(S.SCR, 0x5A)
    u.dev.enqueue_input(b"pending")
    state = u.dev.save()
    data = codec.decode(codec.encode(state))
    v = Uart()
    v.dev.restore(S.SerialState(**data))
    assert v.dev.save() == state
    assert v.irq == [1]                    # the pending input is announced again
    assert bytes(v.r(S.DATA) for _ in range(7)) == b"pending"
    with pytest.raises(SnapshotError):
        v.dev.restore(replace(state, rx=b"x" * (S.RX_FIFO_MAX + 1)))


def test_i8042_reset_and_ctrl_alt_del():
    resets, irq = [], []
    k = K.I8042(lambda: resets.append(1), irq.append)
    assert k.read(4, 1)[0] & K.STATUS_UNLOCKED
    k.write(4, bytes([K.CMD_SELF_TEST]))
    assert k.read(4, 1)[0] & K.STATUS_OBF and k.read(0, 1)[0] == 0x55
    k.send_ctrl_alt_del()
    assert irq[:2] == [1, 0]
    codes = []
    while k.read(4, 1)[0] & K.STATUS_OBF:
        codes.append(k.read(0, 1)[0])
    assert tuple(codes) == K.CTRL_ALT_DEL
    assert not resets
    k.write(4, bytes([K.CMD_RESET_CPU]))
    assert resets == [1]


def test_power_button():
    off = []
    p = PowerButton(lambda: off.append(1))
    p.write(0, (0x1000).to_bytes(2, "little"))
    assert not off
    p.write(0, (0x2000).to_bytes(2, "little"))
    assert off == [1]
