"""Virtqueue index arithmetic: 16-bit wrapping indices, notification windows, vring bases.

Indices in both ring layouts are free-running 16-bit counters that wrap; every comparison
between them is made modulo 2^16. These functions are the one place that arithmetic is
written down, and :mod:`vdpacert.model.z3_proofs` proves their properties over all 2^16
values rather than trusting examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

U16: Final = 0xFFFF
PACKED_IDX_MASK: Final = 0x7FFF  # packed indices are 15 bits; bit 15 carries the wrap counter


def u16(value: int) -> int:
    return value & U16


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Must a publish that moved an index from ``old_idx`` to ``new_idx`` notify?

    True exactly when ``event_idx`` lies in the window ``[old_idx, new_idx)`` modulo 2^16
    (virtio v1.3 §2.7.7 and §2.7.10, with VIRTIO_F_EVENT_IDX).
    """
    return u16(new_idx - event_idx - 1) < u16(new_idx - old_idx)


def split_inflight(avail_idx: int, last_avail_idx: int) -> int:
    """Chains the driver has published that the device has not taken yet."""
    return u16(avail_idx - last_avail_idx)


@dataclass(frozen=True)
class PackedVqState:
    """``struct vdpa_vq_state_packed``: where the device is in a packed ring."""

    last_avail_idx: int
    last_avail_counter: int
    last_used_idx: int
    last_used_counter: int

    def __post_init__(self) -> None:
        for name in ("last_avail_idx", "last_used_idx"):
            if not 0 <= getattr(self, name) <= PACKED_IDX_MASK:
                raise ValueError(f"{name} is a 15-bit index, got {getattr(self, name)}")
        for name in ("last_avail_counter", "last_used_counter"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} is a wrap counter (0 or 1), got {getattr(self, name)}")


def encode_packed_base(state: PackedVqState) -> int:
    """The 32-bit ``vhost_vring_state.num`` for VHOST_SET/GET_VRING_BASE on a packed ring.

    Bits 0-14 last_avail_idx, bit 15 its wrap counter, bits 16-30 last_used_idx, bit 31 its
    wrap counter (Linux ``drivers/vhost/vdpa.c``, vhost_vdpa_vring_ioctl).
    """
    return (
        state.last_avail_idx
        | state.last_avail_counter << 15
        | state.last_used_idx << 16
        | state.last_used_counter << 31
    )


def decode_packed_base(num: int) -> PackedVqState:
    if not 0 <= num <= 0xFFFFFFFF:
        raise ValueError(f"a vring base is a 32-bit value, got {num}")
    return PackedVqState(
        last_avail_idx=num & PACKED_IDX_MASK,
        last_avail_counter=num >> 15 & 1,
        last_used_idx=num >> 16 & PACKED_IDX_MASK,
        last_used_counter=num >> 31 & 1,
    )
