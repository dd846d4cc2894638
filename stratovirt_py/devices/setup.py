"""Create the configured virtio devices and plug them into virtio-mmio slots."""

from __future__ import annotations


def add_virtio_devices(vmm) -> None:
    if vmm.cfg.devices:
        from ..errors import ConfigError
        raise ConfigError("virtio devices are not wired yet")
