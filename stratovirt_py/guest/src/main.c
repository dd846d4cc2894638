/* stratovirt-py test guest: main program (runs at CPL3, IOPL=3). */
#include "lib.h"
#include "virtio.h"

extern char _bss_start[], _bss_end[];

volatile u64 hb_counter;

static void copy_cmdline(u32 kind, u64 ptr)
{
    u64 addr;
    if (kind == BOOT_PVH) {
        addr = *(volatile u64 *)(ptr + 0x18);          /* hvm_start_info.cmdline_paddr */
    } else {
        addr = *(volatile u32 *)(ptr + 0x228);          /* hdr.cmd_line_ptr */
        addr |= (u64)*(volatile u32 *)(ptr + 0x0c8) << 32; /* ext_cmd_line_ptr */
    }
    cmdline[0] = 0;
    if (!addr || addr >= 0x100000000UL)
        return;
    const volatile char *src = (const volatile char *)addr;
    size_t i;
    for (i = 0; i < sizeof(cmdline) - 1 && src[i]; i++)
        cmdline[i] = src[i];
    cmdline[i] = 0;
}

/* The initrd the loader announced in boot_params (Linux protocol only). */
static void report_initrd(u32 kind, u64 ptr)
{
    if (kind == BOOT_PVH)
        return;
    u64 addr = *(volatile u32 *)(ptr + 0x218) | (u64)*(volatile u32 *)(ptr + 0x0c0) << 32;
    u64 size = *(volatile u32 *)(ptr + 0x21c) | (u64)*(volatile u32 *)(ptr + 0x0c4) << 32;
    if (!size)
        return;
    char hex[33];
    hexdump_str(hex, (const void *)addr, size < 16 ? size : 16);
    kprintf("initrd: addr 0x%lx size %lu first %s\n", addr, size, hex);
}

/* sv.serin: read one line from COM1 (polling LSR.DR), echo it as "serial-in: <line>". */
static void serial_in_line(void)
{
    char line[80];
    size_t n = 0;
    u64 end = rdtsc() + ms_to_tsc(10000);
    kprintf("serial-in: ready\n");
    while (n < sizeof(line) - 1 && (i64)(rdtsc() - end) < 0) {
        if (!(inb(0x3fd) & 1)) {
            cpu_relax();
            continue;
        }
        char c = (char)inb(0x3f8);
        if (c == '\r' || c == '\n')
            break;
        line[n++] = c;
    }
    line[n] = 0;
    kprintf("serial-in: %s\n", line);
}

static u64 param_u64(const char *key, u64 dflt)
{
    const char *v = cmdline_param(key);
    if (!v || !*v || *v == ' ')
        return dflt;
    return parse_u64(v, NULL);
}

static __attribute__((noreturn)) void heartbeat(u64 ms, u64 max)
{
    u64 interval = ms_to_tsc(ms);
    u64 next = rdtsc() + interval;
    for (;;) {
        u64 now;
        while ((i64)((now = rdtsc()) - next) < 0) {
            /* A restored snapshot may see the TSC jump backwards. */
            if (next - now > 2 * interval)
                next = now + interval;
            cpu_relax();
        }
        u64 n = read_volatile64((const u64 *)&hb_counter) + 1;
        write_volatile64((u64 *)&hb_counter, n);
        kprintf("heartbeat %lu\n", n);
        virtio_io_tick(n);
        if (max && n >= max)
            poweroff();
        next += interval;
        now = rdtsc();
        if ((i64)(now - next) > (i64)interval)
            next = now + interval; /* do not burst after a pause */
    }
}

__attribute__((noreturn)) void guest_main(u32 kind, u64 ptr)
{
    memset(_bss_start, 0, (size_t)(_bss_end - _bss_start));
    copy_cmdline(kind, ptr);

    kprintf("SVGUEST v1 booted\n");
    serial_lock();
    serial_write("cmdline: ", 9);
    serial_write(cmdline, strlen(cmdline));
    serial_write("\n", 1);
    serial_unlock();
    kprintf("hb-addr: 0x%lx\n", (u64)&hb_counter);
    report_initrd(kind, ptr);
    tsc_calibrate();

    if (cmdline_param("sv.reset"))
        reset();
    if (cmdline_param("sv.triplefault"))
        sys_triplefault();
    if (cmdline_param("sv.poweroff"))
        poweroff();

    if (cmdline_param("sv.smp"))
        smp_boot();
    if (cmdline_param("sv.serin"))
        serial_in_line();

    virtio_main();

    /* sv.initwork=<ms>: busy work standing in for an application's start-up (a
     * template taken after it lets clones skip it). */
    u64 work = param_u64("sv.initwork", 0);
    if (work) {
        u64 end = rdtsc() + ms_to_tsc(work);
        while ((i64)(rdtsc() - end) < 0)
            cpu_relax();
        kprintf("initwork: done after %lu ms\n", work);
    }

    u64 hb = param_u64("sv.hb", 100);
    u64 hbmax = param_u64("sv.hbmax", 0);
    if (hb == 0) {
        kprintf("idle\n");
        sys_halt();
    }
    heartbeat(hb, hbmax);
}
