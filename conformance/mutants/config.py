"""Seeded config-space bugs (virtio v1.3 §2.5, §5.1.4; vhost-vdpa GET/SET_CONFIG bounds)."""

from __future__ import annotations

import errno

from vdpacert.impl.sim_net import SimNet

__all__ = ["EXTRA_CONFIG_BYTES", "ConfigSizeOverreported", "ConfigWriteSpills"]

#: How far past the real struct virtio_net_config the over-reporting mutant claims config space.
EXTRA_CONFIG_BYTES = 8


class ConfigSizeOverreported(SimNet):
    """Bug: GET_CONFIG_SIZE counts fields this device does not have (8 bytes past struct virtio_net_config);
    accesses there are accepted (reads give zeroes, writes vanish) instead of refused as out of bounds."""

    def get_config_size(self) -> int:
        return super().get_config_size() + EXTRA_CONFIG_BYTES

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.get_config_size():
            raise OSError(errno.EINVAL, f"config access of {length} bytes at {offset}")

    def get_config(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return (self.config_space + bytes(EXTRA_CONFIG_BYTES))[offset:offset + length]

    def set_config(self, offset: int, data: bytes) -> None:
        real = super().get_config_size()
        if offset < real:
            super().set_config(offset, bytes(data[:real - offset]))


class ConfigWriteSpills(SimNet):
    """Bug: the firmware applies a driver's config write as whole 32-bit words, filling the bytes of each
    word the driver did not write with zeroes: a one-byte write clobbers its neighbours (part of the MAC).

    Storing the written bytes themselves would be allowed (the write rules bind the driver); changing
    bytes the driver never wrote, with no configuration change notification, is not.
    """

    def write_config(self, offset: int, data: bytes) -> None:
        start, end = offset & ~3, min(-(-(offset + len(data)) // 4) * 4, self.get_config_size())
        words = bytearray(end - start)
        words[offset - start:offset - start + len(data)] = data
        self.update_config(start, bytes(words), notify=False)
