"""The seeded-bug zoo by name: every mutant, its reference device, its bug and the clause it should trip.

A mutant is a parent driver built on a reference device (sim-net or sim-blk) with one realistic
bug. The suite is meant to kill each of them: ``vdpacert mutants`` runs the quick profile
against every entry of :data:`MUTANTS` and reports which clause caught it. Each one is also a
``python:`` target::

    --target python:vdpacert.conformance.mutants.registry:make:name=reset_keeps_vq_state
    --target python:vdpacert.conformance.mutants.registry:make:name=mq_pairs_above_max,max_vq_pairs=2

(:func:`target_string` builds that string). The other attributes are the reference device's
own (``capacity``, ``queue_size``, ``max_vq_pairs``, ``mtu``, ``mac``, ``features``, ...).

``clause_hint`` names the clause the bug breaks, an id of the conformance clause catalog
(:mod:`vdpacert.conformance.clauses`: a model rule, or a suite clause where no single rule owns
the observation); :func:`uncatalogued_hints` lists any that is not, and must list none.

The mutants are parent drivers, so unlike the rest of ``conformance/`` they are written against
``vdpacert.impl`` (the parent-driver protocol and the reference devices they extend); nothing
in the suite imports them except through a ``python:`` target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdpacert.conformance.mutants import blk, config, dirty_log, features, iotlb, net, rings, status, suspend
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.sim_net import SimNet

__all__ = ["DEVICE_NAME", "MUTANTS", "Mutant", "make", "reference", "target_string", "uncatalogued_hints"]

#: The name every mutant device gets (as the embedded targets name theirs): MAC and serial follow it.
DEVICE_NAME = "vdpa0"
BASES: dict[str, type[SimDevice]] = {"sim-net": SimNet, "sim-blk": SimBlk}


@dataclass(frozen=True)
class Mutant:
    """One seeded bug: ``factory(**attrs)`` builds the buggy parent on ``base_target``'s device."""

    name: str
    base_target: str  # "sim-net" or "sim-blk"
    factory: Callable[..., SimDevice]
    bug: str  # one line
    clause_hint: str  # model rule id (or proposed clause id) the bug should trip
    area: str  # features, status, rings, suspend, config, iotlb, dirty_log, net, blk


def _m(name: str, cls: type[SimDevice], bug: str, clause: str) -> Mutant:
    base = "sim-net" if issubclass(cls, SimNet) else "sim-blk"
    area = cls.__module__.rsplit(".", 1)[-1]
    return Mutant(name, base, cls, bug, clause, area)


_ALL = [
    # feature negotiation
    _m("features_ok_broken_dependency", features.FeaturesOkBrokenDependency,
       "FEATURES_OK accepted for a set that breaks a dependency (CTRL_RX without CTRL_VQ)",
       "status.device.refuse_invalid_features"),
    _m("features_ok_without_version_1", features.FeaturesOkWithoutVersion1,
       "FEATURES_OK accepted for a set without VERSION_1", "status.device.refuse_invalid_features"),
    _m("offer_missing_dependency", features.OfferMissingDependency,
       "CTRL_RX / CTRL_MAC_ADDR offered without the CTRL_VQ they need", "net.CTRL_RX.requires"),
    # status and reset
    _m("reset_keeps_vq_state", status.ResetKeepsVqState,
       "reset leaves last_avail_idx: GET_VRING_BASE after reset is the old position", "status.device.reset_clears"),
    _m("consume_before_driver_ok", status.ConsumeBeforeDriverOk,
       "buffers consumed on a kick after FEATURES_OK, before DRIVER_OK", "suite.status.no_use_before_driver_ok"),
    _m("needs_reset_not_sticky", status.NeedsResetNotSticky,
       "DEVICE_NEEDS_RESET cleared by the driver's next status write", "status.device.needs_reset_sticks"),
    # notifications
    _m("event_idx_always_notify", rings.EventIdxAlwaysNotify,
       "used-buffer notification sent although used_event suppresses it",
       "notify.split.used.event_idx.event_not_passed"),
    _m("event_idx_missed_notify", rings.EventIdxMissedNotify,
       "notification missed when used_event lies inside the batch but is not its last entry",
       "notify.split.used.event_idx.event_passed"),
    # rings
    _m("used_idx_wrap_off_by_one", rings.UsedIdxWrapOffByOne,
       "used idx advanced modulo 0xFFFF: publishing 65535 writes 0", "ring.split.device.used_ring"),
    _m("packed_wrap_counter_not_flipped", rings.PackedWrapCounterNotFlipped,
       "packed used descriptors always flagged with wrap counter 1", "ring.packed.device.used_descriptor"),
    _m("write_past_writable_len", rings.WritePastWritableLen,
       "one byte written past the end of the last device-writable buffer", "ring.device.writes_only_given_memory"),
    _m("write_into_readable", rings.WriteIntoReadable,
       "status byte written into a device-readable descriptor", "ring.split.device.no_write_readable"),
    _m("nested_indirect_followed", rings.NestedIndirectFollowed,
       "an indirect descriptor inside an indirect table is followed", "ring.bad_input.nested_indirect"),
    _m("descriptor_cycle_unbounded", rings.DescriptorCycleUnbounded,
       "a looping chain is walked 10 x num deep, then served as a request", "ring.bad_input.descriptor_loop"),
    _m("used_len_counts_readable", rings.UsedLenCountsReadable,
       "used len counts the readable bytes too (more than the chain's writable length)",
       "ring.split.device.used_ring"),
    # suspend and vring base
    _m("vring_base_from_avail_idx", suspend.VringBaseFromAvailIdx,
       "GET_VRING_BASE after suspend reports the driver's avail idx, not last_avail_idx",
       "suite.lockstep.vq_state"),
    _m("set_vring_base_ignored", suspend.SetVringBaseIgnored,
       "SET_VRING_BASE answered success but not applied", "suite.lockstep.vq_state"),
    _m("suspend_keeps_processing", suspend.SuspendKeepsProcessing,
       "kicks still processed while suspended", "suite.suspend.no_progress"),
    _m("resume_loses_kick", suspend.ResumeLosesKick,
       "a kick that arrived while suspended is not processed at resume", "suite.suspend.kick_not_lost"),
    _m("vring_base_drops_wrap_counters", suspend.VringBaseDropsWrapCounters,
       "packed GET_VRING_BASE reports both wrap counters as 1", "suite.lockstep.vq_state"),
    # config space
    _m("config_size_overreported", config.ConfigSizeOverreported,
       "config size over-reported by 8: out-of-bounds config writes accepted", "vdpa_device.config.bounds"),
    _m("config_write_spills", config.ConfigWriteSpills,
       "a driver's config write applied as whole 32-bit words: the bytes beside it are zeroed",
       "suite.lockstep.config"),
    # memory translation
    _m("iotlb_invalidate_ignored", iotlb.InvalidateIgnored,
       "IOTLB INVALIDATE acknowledged but the translation stays", "suite.iotlb.no_access_unmapped"),
    _m("identity_map_kept", iotlb.IdentityMapKept,
       "an identity pass-through map stays under userspace's map: unmapped IOVAs reachable",
       "suite.iotlb.no_access_unmapped"),
    _m("iotlb_perm_ignored", iotlb.PermIgnored,
       "read-only mappings programmed read-write: the device writes RO memory", "suite.iotlb.no_access_unmapped"),
    _m("asid_ignored", iotlb.AsidIgnored,
       "SET_GROUP_ASID acknowledged, every group still translates through ASID 0", "suite.iotlb.asid_isolation"),
    # dirty log
    _m("dirty_log_misses_used_ring", dirty_log.LogMissesUsedRing,
       "VHOST_VRING_F_LOG dropped: used-ring writes not logged", "suite.dirty_log.covers_used_ring"),
    _m("dirty_log_misses_buffers", dirty_log.LogMissesBufferWrites,
       "writes into device-writable buffers not logged", "suite.dirty_log.covers_writes"),
    # device types
    _m("mq_pairs_above_max", net.MqPairsAboveMax,
       "VQ_PAIRS_SET above max_virtqueue_pairs acked OK", "net.ctrl.MQ_VQ_PAIRS_SET.bad_value"),
    _m("blk_write_past_capacity", blk.BlkWritePastCapacity,
       "OUT running past the capacity stored as far as it fits and answered OK", "blk.OUT.beyond_capacity"),
    _m("get_id_not_nul_padded", blk.GetIdNotNulPadded,
       "GET_ID serial not NUL-padded to 20 bytes", "blk.GET_ID.ok"),
]

#: Every mutant by name, in a stable order.
MUTANTS: dict[str, Mutant] = {mutant.name: mutant for mutant in _ALL}


def _device_attrs(base_target: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """Target-string attributes as the device class takes them (``mac`` as text -> bytes)."""
    out = dict(attrs)
    mac = out.get("mac")
    if base_target == "sim-net" and isinstance(mac, str):
        out["mac"] = bytes(int(part, 16) for part in mac.split(":"))
    return out


def make(name: str, **attrs: Any) -> SimDevice:
    """A new instance of mutant ``name`` (the ``python:`` target factory); ValueError for an unknown name."""
    mutant = MUTANTS.get(name)
    if mutant is None:
        raise ValueError(f"no mutant {name!r}; known: {', '.join(MUTANTS)}")
    return mutant.factory(DEVICE_NAME, **_device_attrs(mutant.base_target, attrs))


def reference(name: str, **attrs: Any) -> SimDevice:
    """The honest device mutant ``name`` is built on, with the same attributes (for differential runs)."""
    mutant = MUTANTS.get(name)
    if mutant is None:
        raise ValueError(f"no mutant {name!r}; known: {', '.join(MUTANTS)}")
    return BASES[mutant.base_target](DEVICE_NAME, **_device_attrs(mutant.base_target, attrs))


def target_string(name: str, **attrs: int | str) -> str:
    """The ``--target`` string that certifies mutant ``name`` (attributes as ``k=v``)."""
    if name not in MUTANTS:
        raise ValueError(f"no mutant {name!r}")
    extra = "".join(f",{key}={value}" for key, value in sorted(attrs.items()))
    return f"python:{__name__}:make:name={name}{extra}"


def uncatalogued_hints() -> dict[str, str]:
    """Mutant name -> clause hint, for hints that are not ids of the conformance clause catalog."""
    from vdpacert.conformance import clauses

    return {mutant.name: mutant.clause_hint for mutant in MUTANTS.values() if not clauses.is_clause(mutant.clause_hint)}
