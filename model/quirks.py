"""Where Linux's vDPA stack departs from what the model predicts, named so a target can declare it.

The model predicts what a conforming device and interface answer. Linux's vhost-vdpa and its
simulator parent (vdpa_sim) sometimes answer otherwise: they accept what the spec says a
device must refuse, skip a check the interface documents, or lose state the spec keeps. Each
such difference is a :class:`Quirk`: the model's rule it breaks, what the spec (or the model,
where the spec is silent) expects, and what Linux does, with the Linux function that does it.
A target profile lists the quirks it is known to have; the conformance suite then reports a
matching failure as a declared quirk instead of a conformance failure.

Facts were read from Linux 6.x ``drivers/vhost/{vdpa,vhost,iotlb}.c`` and
``drivers/vdpa/vdpa_sim/vdpa_sim.c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from . import sections
from .spec import Citation, LinuxSource, SpecError


@dataclass(frozen=True)
class Quirk:
    """One known difference between a Linux target and the model.

    ``rule`` is the model's rule id that the target breaks, ``citation`` the spec section (or,
    where the spec is silent, the Linux source) behind that rule, ``spec_says`` what the model
    expects and ``linux_does`` what the target does instead, in ``linux_source``.
    """

    name: str
    rule: str
    citation: Citation
    spec_says: str
    linux_does: str
    linux_source: LinuxSource


class UnknownQuirk(SpecError, KeyError):
    """A quirk name the registry does not hold."""


def _sim(symbol: str) -> LinuxSource:
    return LinuxSource("drivers/vdpa/vdpa_sim/vdpa_sim.c", symbol)


_ALL: Final = (
    # -- vdpa_sim (the simulator parent) -----------------------------------------------------
    Quirk(
        "vdpa_sim.features_ok_never_refused",
        "status.device.refuse_invalid_features",
        sections.FEATURE_BITS_DEVICE,
        "a device must not set FEATURES_OK for a feature set that breaks a MUST dependency",
        "stores the status byte as written, so FEATURES_OK sticks for any feature set",
        _sim("vdpasim_set_status"),
    ),
    Quirk(
        "vdpa_sim.masks_unoffered_features",
        "features.subset_of_offered",
        sections.FEATURE_BITS_DEVICE,
        "a set with bits the device did not offer is invalid: FEATURES_OK must be refused",
        "silently drops unoffered bits in set_driver_features and then accepts FEATURES_OK",
        _sim("vdpasim_set_driver_features"),
    ),
    Quirk(
        "vdpa_sim.set_features_requires_access_platform",
        "vdpa_device.set_driver_features",
        sections.FEATURE_BITS_DEVICE,
        "writing the driver features always succeeds; a device refuses a set by not keeping FEATURES_OK",
        "VHOST_SET_FEATURES fails with EINVAL when VIRTIO_F_ACCESS_PLATFORM is not in the set",
        _sim("vdpasim_set_driver_features"),
    ),
    Quirk(
        "vdpa_sim.used_idx_reset_on_ready",
        "vdpa_device.vq_state.used_idx_preserved",
        sections.SPLIT_USED_RING,
        "a restored split queue continues from the used index in ring memory, keeping in-flight "
        "buffers (last_avail_idx - used_idx) outstanding",
        "sets last_used_idx = last_avail_idx when a queue becomes ready, dropping in-flight buffers",
        _sim("vdpasim_queue_ready"),
    ),
    Quirk(
        "vdpa_sim.packed_vq_state_ignored",
        "vdpa_device.vq_state.packed",
        sections.PACKED_WRAP_COUNTERS,
        "a packed queue's state is both indices and both wrap counters, restored as given",
        "get/set_vq_state only handle the split avail_index; packed counters are not kept",
        _sim("vdpasim_set_vq_state"),
    ),
    Quirk(
        "vdpa_sim.passthrough_default_map",
        "iotlb.translate.miss",
        sections.vhost_iotlb("vhost_iotlb_init"),
        "an address space with no mapping translates nothing: every device access faults",
        "every address space starts (and returns after reset_map or a CLEAN_MAP reset) as an identity "
        "read-write map of all 2^64 addresses",
        _sim("vdpasim_create"),
    ),
    Quirk(
        "vdpa_sim.set_group_asid_group_off_by_one",
        "vdpa_device.set_group_asid.group",
        sections.vhost_vdpa("vhost_vdpa_vring_ioctl"),
        "a group index equal to the number of groups is out of range (EINVAL)",
        "checks group > ngroups, so group == ngroups is accepted",
        _sim("vdpasim_set_group_asid"),
    ),
    Quirk(
        "vdpa.iotlb_limit_unenforced",
        "iotlb.update.limit",
        sections.vhost_iotlb("vhost_iotlb_add_range_ctx"),
        "an address space holding its maximum number of mappings refuses another (ENOSPC)",
        "a vhost_iotlb limit only applies with VHOST_IOTLB_FLAG_RETIRE (evicting the oldest); vdpa_sim's "
        "max_iotlb_entries=2048 is never enforced",
        sections.vhost_iotlb("vhost_iotlb_add_range_ctx"),
    ),
    Quirk(
        "vdpa.get_config_before_features_sets_zero",
        "vdpa_device.get_config.no_side_effect",
        sections.CONFIG_SPACE_DEVICE,
        "reading device configuration before the features are set has no side effect",
        "assumes a legacy guest and calls set_driver_features(0) first",
        LinuxSource("include/linux/vdpa.h", "vdpa_get_config_unlocked"),
    ),
    # -- vhost-vdpa (the char device) ----------------------------------------------------------
    Quirk(
        "vhost_vdpa.iotlb_perm_unchecked",
        "iotlb.update.perm",
        sections.VHOST_TYPES_UAPI,
        "an IOTLB update's perm is RO, WO or RW; anything else is refused (EINVAL)",
        "accepts any perm byte, including 0 (a mapping nothing may use)",
        sections.vhost_vdpa("vhost_vdpa_process_iotlb_update"),
    ),
    Quirk(
        "vhost_vdpa.invalidate_range_unchecked",
        "iotlb.invalidate.size_zero",
        sections.vhost_iotlb("vhost_iotlb_del_range"),
        "an invalidation of size 0, or one that wraps past 2^64, is refused (EINVAL)",
        "accepts it; iova 0 with size 0 computes last = 2^64 - 1 and removes every mapping",
        sections.vhost_vdpa("vhost_vdpa_unmap"),
    ),
    Quirk(
        "vhost_vdpa.update_split_into_chunks",
        "iotlb.update.one_entry",
        sections.vhost_vdpa("vhost_vdpa_pa_map"),
        "one UPDATE adds one mapping",
        "pins the range and adds one mapping per physically contiguous chunk (PA parents)",
        sections.vhost_vdpa("vhost_vdpa_pa_map"),
    ),
    Quirk(
        "vhost_vdpa.va_map_skips_private_memory",
        "iotlb.update.maps_range",
        sections.vhost_vdpa("vhost_vdpa_va_map"),
        "a successful UPDATE maps the whole range",
        "for use_va parents only shared file-backed VMAs are mapped; anonymous or private memory in the "
        "range is silently left unmapped",
        sections.vhost_vdpa("vhost_vdpa_va_map"),
    ),
    Quirk(
        "vhost_vdpa.vring_num_bounds_unchecked",
        "vhost_vdpa.vring_num.bounds",
        sections.VIRTQUEUES,
        "a queue size above get_vq_num_max or below get_vq_num_min is refused (EINVAL)",
        "only checks non-zero, <= 0xffff and a power of 2; set_vq_num cannot fail",
        sections.vhost_core("vhost_vring_set_num"),
    ),
    Quirk(
        "vhost_vdpa.desc_alignment_unchecked",
        "vhost_vdpa.vring_addr.desc_align",
        sections.SPLIT_VIRTQUEUES,
        "the descriptor table/ring is 16-byte aligned; a misaligned address is refused (EINVAL)",
        "checks the alignment of the avail, used and log addresses but not of the descriptor address",
        sections.vhost_core("vhost_vring_set_addr"),
    ),
    Quirk(
        "vhost_vdpa.enable_after_driver_ok_unchecked",
        "vhost_vdpa.backend_features.unsupported",
        sections.vhost_vdpa("vhost_vdpa_unlocked_ioctl"),
        "a backend feature the parent does not support is refused (EOPNOTSUPP)",
        "accepts VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK whether or not the parent reports it",
        sections.vhost_vdpa("vhost_vdpa_unlocked_ioctl"),
    ),
    Quirk(
        "vhost_vdpa.stale_ring_layout_after_reset",
        "vhost_vdpa.vring_base.layout",
        sections.DEVICE_RESET_DEVICE,
        "after a reset no feature is negotiated, so vring bases use the split encoding",
        "keeps the features of the last VHOST_SET_FEATURES in its own vq state, so a packed encoding "
        "survives the reset until the next SET_FEATURES",
        sections.vhost_vdpa("vhost_vdpa_set_features"),
    ),
)

#: Every known quirk by name.
QUIRKS: Final[Mapping[str, Quirk]] = MappingProxyType({q.name: q for q in _ALL})
assert len(QUIRKS) == len(_ALL), "quirk names must be unique"


def quirk(name: str) -> Quirk:
    """The quirk called ``name``; :class:`UnknownQuirk` if the registry has none."""
    try:
        return QUIRKS[name]
    except KeyError:
        raise UnknownQuirk(name) from None


def quirks_for_rule(rule: str) -> tuple[Quirk, ...]:
    """The quirks that excuse a breach of ``rule`` (what a failing check looks up)."""
    return tuple(q for q in _ALL if q.rule == rule)
