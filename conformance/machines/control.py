"""The control path in lockstep: every vhost-vdpa ioctl and IOTLB message, valid and hostile.

:class:`ControlMachine` is a Hypothesis ``RuleBasedStateMachine`` over one
:class:`~vdpacert.conformance.lockstep.Lockstep`: each rule applies one operation to the model and
the target, and the invariant compares every observable after every step. Each example starts from
``target.reopen()``, with 64 KiB of guest memory and an eventfd made for that open.

Inputs are drawn to reach both the accepted and the refused side of every rule: feature sets come
from the Z3 encodings (valid completions, sets breaking exactly one rule, random subsets of the offer,
bits not offered); status writes follow the init sequence or break it (clearing bits, skipping steps,
FAILED, reset at any point); vring indices run past the queue count; sizes, addresses and bases are
valid, out of range, misaligned; IOTLB messages overlap, are empty, wrap, carry bad permissions or
address spaces, unknown types and the v1 layout. :func:`control_machine` binds the machine to a target.

Besides the one-operation rules, a few *sweep* rules walk every case of one family in a single step
(every feature set breaking exactly one rule, every way a status write breaks a driver rule, every
misaligned or out-of-range vring setting, the extent of one IOTLB mapping, ...): a quick run with
derandomized examples then reaches each clause many times instead of by luck, at the cost of a few
dozen cheap requests per sweep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vdpacert.conformance.lockstep import Lockstep
from vdpacert.conformance.observe import Value, config_layout
from vdpacert.conformance.targets import Target
from vdpacert.model import features as feature_rules
from vdpacert.model import z3_features
from vdpacert.model.iotlb import UPDATE_OVERLAP
from vdpacert.model.quirks import QUIRKS
from vdpacert.model.status import StatusBit
from vdpacert.model.vhost_vdpa import IotlbMessageError
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED

__all__ = ["MEMORY_SIZE", "ControlMachine", "control_machine", "feature_sets"]

#: Guest memory each example maps from (its user addresses are the only backed ones the model knows).
MEMORY_SIZE = 0x10000
_U64_MAX = (1 << 64) - 1
_U32_MAX = 0xFFFFFFFF
#: User addresses no GuestMemory can ever occupy (below mmap_min_addr, in the kernel half).
_UNBACKED = (0x1000, 0xFFFF_8000_0000_0000)
_FEATURE_KINDS = st.sampled_from(["valid", "breaking", "breaking", "subset", "not_offered", "any"])
_INIT = (StatusBit.ACKNOWLEDGE, StatusBit.DRIVER, StatusBit.FEATURES_OK, StatusBit.DRIVER_OK)
_ACK, _DRIVER, _FEATURES_OK, _DRIVER_OK = (int(bit) for bit in _INIT)
_FAILED, _SUSPEND, _NEEDS_RESET = int(StatusBit.FAILED), int(StatusBit.SUSPEND), int(StatusBit.DEVICE_NEEDS_RESET)
#: A status bit the spec does not define (§2.1).
_UNDEFINED_STATUS_BIT = 0x20
#: Where each vring's driver and device areas start in the example's memory (queue i at +i pages).
_AVAIL, _USED = 0x4000, 0x8000
#: The top of the user half of a 48-bit address space: its last page is never mapped.
_USER_TOP = 0x8000_0000_0000
#: Where UPDATEs of huge user ranges go: far above every other IOVA the machine maps.
_HIGH_IOVA = 0x4000_0000_0000_0000
#: Where the sweeps map and unmap their own IOVA ranges, away from the single-message rules' 0x100000 pages.
_SWEEP_IOVA = 0x80_0000
#: Quirk-only rules (model/quirks.py) a sweep here checks.
_ONE_ENTRY_RULE = QUIRKS["vhost_vdpa.update_split_into_chunks"].rule
_MAPS_RANGE_RULE = QUIRKS["vhost_vdpa.va_map_skips_private_memory"].rule


@functools.cache
def feature_sets(device_id: int, offered: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(valid sets, sets breaking exactly one rule) of a device's offer, both within 64 bits.

    Valid: for every offered bit, the smallest valid set holding it (Z3's ``complete``), and the
    nearest valid set to the whole offer. Breaking: Z3's ``breaking_sets`` that fit the offer, plus,
    for each dependency of an offered feature, a valid set holding it with one required group
    cleared, the nearest valid set without VERSION_1 and with one bit the device did not offer; each
    kept when exactly one rule (MUST or SHOULD) then breaks, so the device's answer depends on that rule.
    """
    valid = set()
    for bit in range(64):
        if offered >> bit & 1:
            word = z3_features.complete(device_id, 1 << bit, offered=offered, include_should=False)
            if word is not None:
                valid.add(word)
    nearest = z3_features.sample_valid(device_id, offered, offered=offered, include_should=False)
    if nearest is not None:
        valid.add(nearest)
    candidates = {word for word in z3_features.breaking_sets(device_id).values() if not word & ~offered}
    for dep in feature_rules.dependency_rules(device_id):
        if not offered & feature_rules.mask_of(device_id, dep.feature):
            continue
        for word in valid:
            if word & feature_rules.mask_of(device_id, dep.feature):
                candidates.update(word & ~feature_rules.mask_of(device_id, *group) for group in dep.requires)
    if nearest is not None:
        candidates.add(nearest & ~feature_rules.mask_of(device_id, "VERSION_1"))
        candidates.update(nearest | 1 << bit for bit in range(64) if not offered >> bit & 1)
    breaking: dict[str, int] = {}  # one set per rule is enough: the device's answer depends on that rule alone
    for word in sorted(candidates):
        found = feature_rules.violations(device_id, word, offered=offered)
        if len(found) == 1:
            breaking.setdefault(found[0].rule, word)
    valid_words = (v for v in valid if v <= _U64_MAX)
    return tuple(sorted(valid_words)), tuple(sorted(b for b in breaking.values() if b <= _U64_MAX))


class ControlMachine(RuleBasedStateMachine):
    """Drive a target and its model through the control path (bind it with :func:`control_machine`)."""

    lockstep: ClassVar[Lockstep]
    valid_features: ClassVar[tuple[int, ...]] = ()
    breaking_features: ClassVar[tuple[int, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.ls = type(self).lockstep
        self.ls.reopen()
        self.memory = self.ls.new_memory(MEMORY_SIZE)
        self.efd = self.ls.eventfd()

    @initialize(setup=st.sampled_from(["none", "owner", "owner", "features_ok", "driver_ok", "driver_ok"]),
                data=st.data())
    def bring_up(self, setup: str, data: st.DataObject) -> None:
        """Start from a fresh open, an owner, or a device brought up to FEATURES_OK or DRIVER_OK (all compared).

        An owner first runs the cheap sweeps once (each feature set breaking one rule, each status write breaking
        one driver rule, each configuration field alone, the extent of one mapping, the IOTLB messages
        vhost-vdpa refuses, a batch of another address space) and resets: Hypothesis
        enables a random subset of the rules in each example, so a quick run would otherwise reach a clause
        only as often as its one rule happens to be drawn.
        """
        if setup == "none":
            return
        self.set_owner()
        self.negotiate_each_breaking_set()
        self.status_driver_errors()
        self.config_field_sweep(write=False)
        self.iotlb_mapping_extent(asid=0, page=0, pages=2)
        self.iotlb_messages_hostile(asid=0, page=0)
        self.iotlb_batch_other_asid(asid=0)
        self.ls.set_status(0)
        if setup == "owner":
            return
        self._bring_up(self._draw_valid(data), driver_ok=setup == "driver_ok")

    def _draw_valid(self, data: st.DataObject) -> int | None:
        """A valid feature set, the ring layout drawn first (split and packed equally often when offered)."""
        packed = data.draw(st.booleans(), label="packed ring")
        sets = [w for w in self.valid_features if bool(w >> VIRTIO_F_RING_PACKED & 1) == packed] or self.valid_features
        return data.draw(st.sampled_from(sets), label="negotiated features") if sets else None

    def _bring_up(self, word: int | None, *, driver_ok: bool) -> None:
        """Backend features as offered, every vring set up over zeroed rings in mapped memory (a running device
        finds nothing to do), every address space mapped, ``word`` negotiated, FEATURES_OK (and DRIVER_OK).

        On the way, what a careless driver would try and vhost-vdpa must refuse (each compared, so every
        example that brings the device up checks them): backend features the device cannot have, a config
        callback that is no file, queue 0's hostile sizes and addresses (:meth:`_vring_hostile`), new features
        once FEATURES_OK is set, and, once running, suspended queue 0 given a position no ring has (above 16
        bits for a split ring, past the last slot for a packed one).
        """
        offer = self.ls.model.VHOST_GET_BACKEND_FEATURES()
        self._backend_features_hostile(offer)
        self._set_backend_features(offer)
        self.set_config_call("bad")
        size = min(256, self.ls.spec.vq_num_max)
        self._vring_hostile(0)
        for index in range(self.nvqs):
            self._set_up_vring(index, size)
        for asid in range(self.ls.spec.nas):
            self._map_all(asid)
        if word is not None:
            self.ls.set_features(word)
        self.ls.set_status(_ACK | _DRIVER | _FEATURES_OK)
        if word is not None:
            self.ls.set_features(word)  # EBUSY once FEATURES_OK stuck
        if driver_ok:
            self.ls.set_status(_ACK | _DRIVER | _FEATURES_OK | _DRIVER_OK)
            m, c = self.ls.model, self.ls.client
            self._op("VHOST_VDPA_SUSPEND", m.VHOST_VDPA_SUSPEND, c.suspend)
            self.ls.set_vring_base(0, _U32_MAX)
            self._op("VHOST_VDPA_RESUME", m.VHOST_VDPA_RESUME, c.resume)

    def _restart(self, word: int | None, *, driver_ok: bool) -> bool:
        """Reset, then :meth:`_bring_up` from an owned open; whether the device then runs as asked."""
        self.ls.set_status(0)
        for status in (_ACK, _ACK | _DRIVER):
            self.ls.set_status(status)
        self._owned()
        self._bring_up(word, driver_ok=driver_ok)
        wanted = _FEATURES_OK | (_DRIVER_OK if driver_ok else 0)
        return self.ls.model.device.status & wanted == wanted

    def _set_up_vring(self, index: int, size: int) -> None:
        """Size, addresses (queue ``index`` at +``index`` pages of each area) and enable: all accepted."""
        m, c = self.ls.model, self.ls.client
        self._vring_num(index, size)
        self._vring_addr(index, index * 0x1000, _AVAIL + index * 0x1000, _USED + index * 0x1000)
        self._op("VHOST_VDPA_SET_VRING_ENABLE", lambda: m.VHOST_VDPA_SET_VRING_ENABLE(index, 1),
                 lambda: c.set_vring_enable(index, 1))

    def _map_all(self, asid: int) -> None:
        """IOVA 0 .. MEMORY_SIZE onto the example's memory, read-write, in address space ``asid``."""
        m, c = self.ls.model, self.ls.client
        uaddr = self.memory.uaddr
        self._op("VHOST_IOTLB_UPDATE", lambda: m.write_msg(T.VHOST_IOTLB_UPDATE, asid, 0, MEMORY_SIZE, uaddr, 3),
                 lambda: c.send_iotlb(T.VHOST_IOTLB_UPDATE, 0, MEMORY_SIZE, uaddr, 3, asid=asid))

    # ----- helpers ----------------------------------------------------------------------------------

    @property
    def nvqs(self) -> int:
        return self.ls.spec.nvqs

    def _op(self, name: str, model_call: Callable[[], object], target_call: Callable[[], Value],
            clause: str = "suite.lockstep.errno") -> bool:
        """One compared operation; whether both sides accepted it."""
        return self.ls.op(name, model_call, target_call, clause=clause)[1].ok

    def _owned(self) -> None:
        """SET_OWNER (compared either way: EBUSY when this open already has an owner)."""
        self.set_owner()

    def _valid_word(self, *, packed: bool | None = None) -> int | None:
        """A valid feature set, with or without RING_PACKED as asked (None: the first valid set)."""
        return next((w for w in self.valid_features if packed is None or bool(w >> VIRTIO_F_RING_PACKED & 1) == packed),
                    None)

    def _update(self, asid: int, iova: int, size: int, uaddr: int, perm: int = T.VHOST_ACCESS_RW) -> bool:
        m, c = self.ls.model, self.ls.client
        return self._op("VHOST_IOTLB_UPDATE", lambda: m.write_msg(T.VHOST_IOTLB_UPDATE, asid, iova, size, uaddr, perm),
                        lambda: c.send_iotlb(T.VHOST_IOTLB_UPDATE, iova, size, uaddr, perm, asid=asid))

    def _invalidate(self, asid: int, iova: int, size: int) -> bool:
        m, c = self.ls.model, self.ls.client
        return self._op("VHOST_IOTLB_INVALIDATE", lambda: m.write_msg(T.VHOST_IOTLB_INVALIDATE, asid, iova, size),
                        lambda: c.send_iotlb(T.VHOST_IOTLB_INVALIDATE, iova, size, asid=asid))

    def _refused_by(self, rule: str) -> bool:
        """Whether the last operation was refused on both sides by ``rule`` (an IOTLB handler's own rule too)."""
        refusal = self.ls.last_refusal
        if isinstance(refusal, IotlbMessageError):
            return rule in (refusal.rule, refusal.cause.rule)
        return refusal is not None and refusal.rule == rule

    def _fd(self, choice: str) -> int:
        return {"eventfd": self.efd, "unbind": T.VHOST_FILE_UNBIND, "bad": -2}[choice]

    def _past_end(self) -> tuple[int, int]:
        """(uaddr, size) of a user range that starts in the example's memory and runs on to the top of the user
        half: whatever else the process has mapped next to the memory, not all of that range is memory (the
        top page is never mapped), so the model's "unbacked" holds however the process's mappings lie."""
        start = self.memory.uaddr + MEMORY_SIZE - 0x1000
        return start, _USER_TOP - start

    def _user_range(self, choice: str, offset: int, size: int) -> tuple[int, int]:
        """(uaddr, size) for an UPDATE: inside the memory (clamped so the range fits), running past its end
        (:meth:`_past_end`, the size replaced), or at an address no process memory can occupy."""
        if choice == "memory":
            return self.memory.uaddr + min(offset % MEMORY_SIZE, max(0, MEMORY_SIZE - size)), size
        if choice == "past_end":
            return self._past_end()
        return _UNBACKED[offset // 0x1000 % len(_UNBACKED)], size

    # ----- owner, features ----------------------------------------------------------------------------

    @rule()
    def set_owner(self) -> None:
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_SET_OWNER", m.VHOST_SET_OWNER, c.set_owner)

    def _draw_features(self, data: st.DataObject, kind: str) -> int:
        offered = self.ls.spec.device_features
        if kind == "valid" and self.valid_features:
            return data.draw(st.sampled_from(self.valid_features), label="valid features")
        if kind == "breaking" and self.breaking_features:
            return data.draw(st.sampled_from(self.breaking_features), label="features breaking one rule")
        if kind == "not_offered" and ~offered & _U64_MAX:
            bits = [b for b in range(64) if not offered >> b & 1]
            base = data.draw(st.sampled_from(self.valid_features or (0,)), label="base")
            return base | 1 << data.draw(st.sampled_from(bits), label="unoffered bit")
        if kind == "any":
            return data.draw(st.integers(0, _U64_MAX), label="features")
        return data.draw(st.integers(0, _U64_MAX), label="subset") & offered

    @rule(data=st.data(), kind=_FEATURE_KINDS)
    def set_features(self, data: st.DataObject, kind: str) -> None:
        self.ls.set_features(self._draw_features(data, kind))

    def _negotiate(self, word: int) -> None:
        for status in (0, _ACK, _ACK | _DRIVER):
            self.ls.set_status(status)
        self.ls.set_features(word)
        self.ls.set_status(_ACK | _DRIVER | _FEATURES_OK)

    @rule(data=st.data(), kind=_FEATURE_KINDS)
    def negotiate(self, data: st.DataObject, kind: str) -> None:
        """Reset, ACKNOWLEDGE, DRIVER, write a feature set, FEATURES_OK: the device must refuse an invalid set."""
        self._negotiate(self._draw_features(data, kind))

    @rule()
    def negotiate_each_breaking_set(self) -> None:
        """Sweep: negotiate every set breaking exactly one feature rule (dependency, VERSION_1, not offered).

        The device must refuse FEATURES_OK for each set breaking a MUST rule and should accept one breaking
        only a SHOULD rule; either way its answer depends on that one rule (see ``Lockstep._judge_features``).
        """
        for word in self.breaking_features:
            self._negotiate(word)

    def _backend_features_hostile(self, offer: int) -> None:
        """The offer plus one thing vhost-vdpa must refuse: DESC_ASID without IOTLB_ASID (EINVAL), DESC_ASID
        from a parent without get_vq_desc_group (EOPNOTSUPP), a bit vhost-vdpa does not know (below and above
        the known ones). A word the device takes after all (it has the op) is compared like a refusal."""
        desc_asid, asid = 1 << T.VHOST_BACKEND_F_DESC_ASID, 1 << T.VHOST_BACKEND_F_IOTLB_ASID
        for word in ((offer | desc_asid) & ~asid, offer | desc_asid | asid, offer | 1, offer | 1 << 9):
            self._set_backend_features(word)

    def _set_backend_features(self, word: int) -> None:
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_SET_BACKEND_FEATURES", functools.partial(m.VHOST_SET_BACKEND_FEATURES, word),
                 functools.partial(c.set_backend_features, word), "suite.lockstep.features")

    @rule(kind=st.sampled_from(["offered", "subset", "unknown"]), word=st.integers(0, _U64_MAX))
    def set_backend_features(self, kind: str, word: int) -> None:
        offer = self.ls.model.VHOST_GET_BACKEND_FEATURES()
        self._set_backend_features(offer if kind == "offered" else word & offer if kind == "subset" else word & 0x3FF)

    # ----- status -------------------------------------------------------------------------------------

    def _status(self, kind: str, value: int = 0) -> None:
        old = self.ls.model.device.status
        driver_bits = [bit for bit in _INIT if not old & bit]
        status: int
        if kind == "next":
            status = old | (driver_bits[0] if driver_bits else StatusBit.FAILED)
        elif kind == "init_all":
            status = old | StatusBit.ACKNOWLEDGE | StatusBit.DRIVER | StatusBit.FEATURES_OK | StatusBit.DRIVER_OK
        elif kind == "failed":
            status = old | StatusBit.FAILED
        elif kind == "clear":
            status = old & ~(1 << value % 8) or StatusBit.ACKNOWLEDGE
        elif kind == "skip":
            status = old | (driver_bits[-1] if driver_bits else StatusBit.DRIVER_OK)
        else:
            status = value
        self.ls.set_status(int(status))

    @rule()
    def status_next_step(self) -> None:
        """The next bit of the initialization sequence (FAILED once it is complete)."""
        self._status("next")

    @rule()
    def status_reset(self) -> None:
        """SET_STATUS 0 at any point."""
        self.ls.set_status(0)

    @rule(kind=st.sampled_from(["init_all", "failed", "clear", "skip", "any"]), value=st.integers(0, 0xFF))
    def status_out_of_order(self, kind: str, value: int) -> None:
        """All steps at once, FAILED, clearing a bit, skipping steps, or any byte."""
        self._status(kind, value)

    @rule()
    def status_driver_errors(self) -> None:
        """Sweep: from a reset, each way a driver breaks a status rule, one rule per write (§2.1, §3.1.1).

        Clearing a bit (vhost-vdpa refuses it), an undefined bit or DEVICE_NEEDS_RESET written, DRIVER_OK
        before FEATURES_OK, a bit set after FAILED, SUSPEND without VIRTIO_F_SUSPEND. The spec leaves the
        device's answer to most of them open; the suite checks it survives them and reports a status the
        rules allow (never FEATURES_OK for features it must refuse).
        """
        for writes in ((_ACK, _DRIVER),  # clears ACKNOWLEDGE
                       (_ACK | _UNDEFINED_STATUS_BIT,), (_ACK | _NEEDS_RESET,),
                       (_ACK, _ACK | _DRIVER, _ACK | _DRIVER | _DRIVER_OK),  # FEATURES_OK skipped
                       (_ACK, _ACK | _FAILED, _ACK | _FAILED | _DRIVER),
                       (_ACK | _SUSPEND,)):
            self.ls.set_status(0)
            for status in writes:
                self.ls.set_status(status)

    @rule(data=st.data())
    def device_error_then_status_write(self, data: st.DataObject) -> None:
        """Make the device meet bad ring input, then write the status: DEVICE_NEEDS_RESET must stay (§2.1.2).

        Every split ring is brought up over mapped memory, its available index written more than the queue
        size ahead (``ring.bad_input.avail_idx_ahead``: the device may set DEVICE_NEEDS_RESET) and kicked. When
        the device reports DEVICE_NEEDS_RESET, the driver then sets FAILED (a write the rules allow), and the
        device's answer must keep DEVICE_NEEDS_RESET. A device that never sets it is not checked here.
        """
        word = self._valid_word(packed=False)
        if word is None or not self._restart(word, driver_ok=True):
            return
        size = min(256, self.ls.spec.vq_num_max)
        ahead = data.draw(st.integers(size + 1, 0xFFFF), label="avail idx")
        for index in range(self.nvqs):
            self.memory.write_u16(_AVAIL + index * 0x1000 + 2, ahead)
        for index in range(self.nvqs):
            self.ls.kick(index)
        self.ls.check_observables()  # the model takes DEVICE_NEEDS_RESET from the device's report
        self.ls.set_status(self.ls.model.device.status | _FAILED)
        for index in range(self.nvqs):
            self.memory.write_u16(_AVAIL + index * 0x1000 + 2, 0)

    # ----- vrings -------------------------------------------------------------------------------------

    def _index(self, data: st.DataObject) -> int:
        """Mostly a queue that exists (the rules behind the index check need one), else one past the end."""
        valid = st.integers(0, self.nvqs - 1)
        return data.draw(st.one_of(valid, valid, valid, st.integers(self.nvqs, self.nvqs + 2), st.just(_U32_MAX)),
                         label="vring index")

    def _vring_addr(self, index: int, desc: int, avail: int, used: int, flags: int = 0, log: int = 0) -> bool:
        m, c = self.ls.model, self.ls.client
        return self._op("VHOST_SET_VRING_ADDR",
                        lambda: m.VHOST_SET_VRING_ADDR(index, desc, avail, used, flags=flags, log_guest_addr=log),
                        lambda: c.set_vring_addr(index, desc, avail, used, flags=flags, log_guest_addr=log))

    def _vring_num(self, index: int, num: int) -> bool:
        m, c = self.ls.model, self.ls.client
        return self._op("VHOST_SET_VRING_NUM", lambda: m.VHOST_SET_VRING_NUM(index, num),
                        lambda: c.set_vring_num(index, num))

    def _vring_hostile(self, index: int) -> None:
        """Every size and address of vring ``index`` that vhost-vdpa refuses, each followed by a valid one.

        Sizes 0, not a power of 2, above 0xffff, above the device's maximum (refused, or taken as a declared
        quirk predicts); addresses with an unknown flag, avail not 2-aligned, used or log not 4-aligned, the
        descriptor area not 16-aligned.
        """
        desc, avail, used = index * 0x1000, _AVAIL + index * 0x1000, _USED + index * 0x1000
        for num in (0, 3, 0x10000, self.ls.spec.vq_num_max * 2, min(256, self.ls.spec.vq_num_max)):
            self._vring_num(index, num)
        for flags, bad_desc, bad_avail, bad_used, log in ((2, 0, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 2, 0),
                                                          (1, 0, 0, 0, 0x102), (0, 8, 0, 0, 0), (0, 0, 0, 0, 0)):
            self._vring_addr(index, desc + bad_desc, avail + bad_avail, used + bad_used, flags, log)

    @rule(data=st.data())
    def vring_settings_hostile(self, data: st.DataObject) -> None:
        """Sweep: :meth:`_vring_hostile` on any queue in whatever state the device is, then a split base above
        16 bits (refused unless the ring is packed) and a valid one."""
        self._owned()
        index = data.draw(st.integers(0, self.nvqs - 1), label="vring index")
        self._vring_hostile(index)
        self.ls.set_vring_base(index, 0x10000 | data.draw(st.integers(0, 0xFFFF), label="base"))
        self.ls.set_vring_base(index, 0)

    @rule(data=st.data(), packed=st.booleans(), base=st.integers(0, _U32_MAX))
    def running_vring_keeps_its_setup(self, data: st.DataObject, packed: bool, base: int) -> None:
        """Bring the device up (split or packed ring), then change a running queue's addresses and base
        (refused: it runs, ``vhost_vdpa.vring.running``), suspend, set any base (taken, or refused: above 16
        bits on a split ring, a slot past the ring on a packed one), resume."""
        index = data.draw(st.integers(0, self.nvqs - 1), label="vring index")
        word = self._valid_word(packed=packed)
        if word is None or not self._restart(word, driver_ok=True):
            return
        self._vring_addr(index, index * 0x1000, _AVAIL + index * 0x1000, _USED + index * 0x1000)
        self.ls.set_vring_base(index, 0)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_VDPA_SUSPEND", m.VHOST_VDPA_SUSPEND, c.suspend)
        self.ls.set_vring_base(index, base)
        self._op("VHOST_VDPA_RESUME", m.VHOST_VDPA_RESUME, c.resume)

    @rule(data=st.data(), base=st.integers(0, _U32_MAX))
    def packed_base_then_reset(self, data: st.DataObject, base: int) -> None:
        """A packed queue's whole position (both indices and wrap counters) set and read back, then a reset:
        the ring layout is split again, so a base above 16 bits is refused (``vhost_vdpa.vring_base.layout``)."""
        word = self._valid_word(packed=True)
        if word is None or not self._restart(word, driver_ok=False):
            return
        index = data.draw(st.integers(0, self.nvqs - 1), label="vring index")
        self.ls.set_vring_base(index, base)
        self.ls.check_observables()  # GET_VRING_BASE of the packed position, before the reset drops it
        self.ls.set_status(0)
        self.ls.set_vring_base(index, base | 0x10000)

    @rule(data=st.data(), num=st.one_of(st.sampled_from([1 << k for k in range(16)]),
                                        st.sampled_from([0, 3, 100, 0x10000, 1 << 20, _U32_MAX])))
    def set_vring_num(self, data: st.DataObject, num: int) -> None:
        index = self._index(data)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_SET_VRING_NUM", lambda: m.VHOST_SET_VRING_NUM(index, num), lambda: c.set_vring_num(index, num))

    @rule(data=st.data(), base=st.integers(0, MEMORY_SIZE // 16 - 1), misalign=st.sampled_from([0, 0, 0, 1, 2, 8]),
          flags=st.sampled_from([0, 0, 1, 2]), log=st.sampled_from([0, 0x100, 0x102]))
    def set_vring_addr(self, data: st.DataObject, base: int, misalign: int, flags: int, log: int) -> None:
        index = self._index(data)
        desc = base * 16 + (misalign if misalign == 8 else 0)
        avail = 0x4000 + base * 2 + (misalign if misalign == 1 else 0)
        used = 0x8000 + base * 4 + (misalign if misalign == 2 else 0)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_SET_VRING_ADDR",
                 lambda: m.VHOST_SET_VRING_ADDR(index, desc, avail, used, flags=flags, log_guest_addr=log),
                 lambda: c.set_vring_addr(index, desc, avail, used, flags=flags, log_guest_addr=log))

    @rule(data=st.data(), num=st.one_of(st.integers(0, 0xFFFF), st.integers(0x10000, _U32_MAX)))
    def set_vring_base(self, data: st.DataObject, num: int) -> None:
        self.ls.set_vring_base(self._index(data), num)

    @rule(data=st.data())
    def get_vring_base(self, data: st.DataObject) -> None:
        index = self._index(data)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_GET_VRING_BASE", lambda: m.VHOST_GET_VRING_BASE(index), lambda: c.get_vring_base(index),
                 "suite.lockstep.vq_state")

    @rule(data=st.data(), num=st.sampled_from([0, 1, 1, 2]))
    def set_vring_enable(self, data: st.DataObject, num: int) -> None:
        index = self._index(data)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_VDPA_SET_VRING_ENABLE", lambda: m.VHOST_VDPA_SET_VRING_ENABLE(index, num),
                 lambda: c.set_vring_enable(index, num))

    @rule(data=st.data(), which=st.sampled_from(["kick", "call", "err"]),
          fd=st.sampled_from(["eventfd", "eventfd", "unbind", "bad"]))
    def set_vring_file(self, data: st.DataObject, which: str, fd: str) -> None:
        index, number = self._index(data), self._fd(fd)
        m, c = self.ls.model, self.ls.client
        model_call = {"kick": m.VHOST_SET_VRING_KICK, "call": m.VHOST_SET_VRING_CALL, "err": m.VHOST_SET_VRING_ERR}
        target_call = {"kick": c.set_vring_kick, "call": c.set_vring_call, "err": c.set_vring_err}
        self._op(f"VHOST_SET_VRING_{which.upper()}", lambda: model_call[which](index, number),
                 lambda: target_call[which](index, number))

    @rule(data=st.data(), desc=st.booleans())
    def get_vring_group(self, data: st.DataObject, desc: bool) -> None:
        index = self._index(data)
        m, c = self.ls.model, self.ls.client
        if desc:
            self._op("VHOST_VDPA_GET_VRING_DESC_GROUP", lambda: m.VHOST_VDPA_GET_VRING_DESC_GROUP(index),
                     lambda: c.get_vring_desc_group(index))
        else:
            self._op("VHOST_VDPA_GET_VRING_GROUP", lambda: m.VHOST_VDPA_GET_VRING_GROUP(index),
                     lambda: c.get_vring_group(index))

    @rule(group=st.integers(0, 4), asid=st.one_of(st.integers(0, 3), st.just(_U32_MAX)))
    def set_group_asid(self, group: int, asid: int) -> None:
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_VDPA_SET_GROUP_ASID", lambda: m.VHOST_VDPA_SET_GROUP_ASID(group, asid),
                 lambda: c.set_group_asid(group, asid))

    @rule()
    def group_asid_sweep(self) -> None:
        """Sweep: every group up to one past the last (the parent's EINVAL where the queue-index check lets
        it through), an address space one past the last, then every group back in address space 0."""
        self._owned()
        spec = self.ls.spec
        for group, asid in ((spec.ngroups, 0), (0, spec.nas), *((g, 0) for g in range(spec.ngroups))):
            self.set_group_asid(group, asid)

    # ----- config, callbacks, log ---------------------------------------------------------------------

    def _config_offset(self, data: st.DataObject) -> int:
        """Mostly inside the configuration space, else anywhere up to 128 (past it for most devices)."""
        inside = st.integers(0, max(0, len(self.ls.spec.config) - 1))
        return data.draw(st.one_of(inside, inside, st.integers(0, 128)), label="config offset")

    @rule(data=st.data(), length=st.one_of(st.integers(0, 16), st.integers(0, 128), st.just(0x1000)))
    def get_config(self, data: st.DataObject, length: int) -> None:
        offset = data.draw(st.one_of(st.just(_U32_MAX), st.integers(0, 128), st.just(self._config_offset(data))),
                           label="offset")
        self.ls.get_config(offset, length)

    @rule(data=st.data(), value=st.binary(min_size=0, max_size=16))
    def set_config(self, data: st.DataObject, value: bytes) -> None:
        self.ls.set_config(self._config_offset(data), value)

    @rule(write=st.booleans())
    def config_field_sweep(self, write: bool) -> None:
        """Sweep: every field of the device type's configuration layout on its own, read, or written with zeros;
        absent fields included (driver rules broken on purpose, the device's answer compared)."""
        layout = config_layout(self.ls.spec.device_id)
        if layout is None:
            return
        for name in layout.names():
            field = layout.field(name)
            if field.end > len(self.ls.spec.config):
                continue
            if write:
                self.ls.set_config(field.offset, bytes(field.size))
            else:
                self.ls.get_config(field.offset, field.size)

    @rule(fd=st.sampled_from(["eventfd", "unbind", "bad"]))
    def set_config_call(self, fd: str) -> None:
        number = self._fd(fd)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_VDPA_SET_CONFIG_CALL", lambda: m.VHOST_VDPA_SET_CONFIG_CALL(number),
                 lambda: c.set_config_call(number))

    @rule(fd=st.sampled_from(["eventfd", "unbind", "bad"]), base=st.booleans())
    def set_log(self, fd: str, base: bool) -> None:
        m, c = self.ls.model, self.ls.client
        if base:
            uaddr = self.memory.uaddr
            self._op("VHOST_SET_LOG_BASE", lambda: m.VHOST_SET_LOG_BASE(uaddr), lambda: c.set_log_base(uaddr))
        else:
            number = self._fd(fd)
            self._op("VHOST_SET_LOG_FD", lambda: m.VHOST_SET_LOG_FD(number), lambda: c.set_log_fd(number))

    # ----- suspend / resume ---------------------------------------------------------------------------

    @rule(resume=st.booleans())
    def suspend_resume(self, resume: bool) -> None:
        m, c = self.ls.model, self.ls.client
        if resume:
            self._op("VHOST_VDPA_RESUME", m.VHOST_VDPA_RESUME, c.resume)
        else:
            self._op("VHOST_VDPA_SUSPEND", m.VHOST_VDPA_SUSPEND, c.suspend)

    # ----- IOTLB --------------------------------------------------------------------------------------

    @rule(asid=st.sampled_from([0, 0, 0, 1, 2, _U32_MAX]), page=st.integers(0, 15), pages=st.integers(0, 4),
          size_kind=st.sampled_from(["pages", "pages", "zero", "wrap", "odd"]),
          uaddr=st.sampled_from(["memory", "memory", "memory", "past_end", "unbacked"]),
          perm=st.sampled_from([T.VHOST_ACCESS_RO, T.VHOST_ACCESS_WO, T.VHOST_ACCESS_RW, T.VHOST_ACCESS_RW, 0, 7]))
    def iotlb_update(self, asid: int, page: int, pages: int, size_kind: str, uaddr: str, perm: int) -> None:
        iova = 0x10_0000 + page * 0x1000 if uaddr != "past_end" else _HIGH_IOVA
        size = {"pages": max(1, pages) * 0x1000, "zero": 0, "wrap": _U64_MAX, "odd": 0x801}[size_kind]
        user, size = self._user_range(uaddr, page * 0x1000, size)
        self._update(asid, iova, size, user, perm)

    @rule(asid=st.sampled_from([0, 0, 1, 2]), page=st.integers(0, 16), pages=st.integers(0, 4),
          size_kind=st.sampled_from(["pages", "pages", "zero", "wrap", "byte"]), at_zero=st.booleans())
    def iotlb_invalidate(self, asid: int, page: int, pages: int, size_kind: str, at_zero: bool) -> None:
        iova = 0 if at_zero and size_kind == "zero" else 0x10_0000 + page * 0x1000
        size = {"pages": max(1, pages) * 0x1000, "zero": 0, "wrap": _U64_MAX, "byte": 1}[size_kind]
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_IOTLB_INVALIDATE", lambda: m.write_msg(T.VHOST_IOTLB_INVALIDATE, asid, iova, size),
                 lambda: c.send_iotlb(T.VHOST_IOTLB_INVALIDATE, iova, size, asid=asid))

    @rule(end=st.booleans(), asid=st.sampled_from([0, 0, 1, 2]))
    def iotlb_batch(self, end: bool, asid: int) -> None:
        kind = T.VHOST_IOTLB_BATCH_END if end else T.VHOST_IOTLB_BATCH_BEGIN
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_IOTLB_BATCH_END" if end else "VHOST_IOTLB_BATCH_BEGIN", lambda: m.write_msg(kind, asid),
                 lambda: c.send_iotlb(kind, asid=asid))

    @rule(msg_type=st.sampled_from([0, T.VHOST_IOTLB_MISS, T.VHOST_IOTLB_ACCESS_FAIL, 7, 0xFF]),
          version=st.sampled_from([T.VHOST_IOTLB_MSG_V2, T.VHOST_IOTLB_MSG_V2, 0, 3]))
    def iotlb_hostile(self, msg_type: int, version: int) -> None:
        m, c = self.ls.model, self.ls.client
        self._op("IOTLB message", lambda: m.write_msg(msg_type, 0, 0x1000, 0x1000, self.memory.uaddr, 3,
                                                      version=version),
                 lambda: c.send_iotlb(msg_type, 0x1000, 0x1000, self.memory.uaddr, 3, version=version))

    @rule(asid=st.sampled_from([0, 0, 1]), page=st.integers(0, 15))
    def iotlb_messages_hostile(self, asid: int, page: int) -> None:
        """Sweep: every IOTLB message vhost-vdpa refuses, around one good mapping of one page.

        UPDATEs of size 0, wrapping past 2^64, with perm 0 or 7, from a user range that runs past the memory or
        has none behind it, overlapping the good one; messages of a type userspace may not send (MISS,
        ACCESS_FAIL, unknown) or of an unknown layout version; INVALIDATEs of size 0 and wrapping (refused, or
        accepted as a declared quirk predicts: those drop every mapping they reach, so they come last).
        """
        self._owned()
        iova, uaddr = _SWEEP_IOVA - 0x10000 + page * 0x1000, self.memory.uaddr
        past_end, past_end_size = self._past_end()
        self._update(asid, iova, 0x1000, uaddr)
        for bad_iova, size, user, perm in ((iova, 0, uaddr, 3), (_U64_MAX & ~0xFFF, 0x2000, uaddr, 3),
                                           (iova + 0x1000, 0x1000, uaddr, 0), (iova + 0x1000, 0x1000, uaddr, 7),
                                           (_HIGH_IOVA, past_end_size, past_end, 3),
                                           (iova + 0x1000, 0x1000, _UNBACKED[page % 2], 3),
                                           (iova, 0x1000, uaddr, 3)):
            if self._update(asid, bad_iova, size, user, perm):  # accepted as a quirk predicts: undo it
                self._invalidate(asid, bad_iova, size)
        for msg_type, version in ((T.VHOST_IOTLB_MISS, T.VHOST_IOTLB_MSG_V2), (T.VHOST_IOTLB_ACCESS_FAIL,
                                  T.VHOST_IOTLB_MSG_V2), (0xFF, T.VHOST_IOTLB_MSG_V2), (T.VHOST_IOTLB_UPDATE, 3)):
            self.iotlb_hostile(msg_type, version)
        self._invalidate(asid, iova, 0x1000)
        self._invalidate(asid, _U64_MAX & ~0xFFF, 0x2000)
        self._invalidate(asid, iova, 0)

    @rule(asid=st.sampled_from([0, 0, 1]), page=st.integers(0, 15), pages=st.integers(2, 4))
    def iotlb_mapping_extent(self, asid: int, page: int, pages: int) -> None:
        """Sweep: map several pages with one UPDATE, then probe what one entry means (vhost_vdpa / vhost_iotlb):

        an UPDATE of the last page overlaps (EEXIST: the whole range was mapped, ``iotlb.update.maps_range``);
        INVALIDATE of the first page drops the mapping whole, so the last page maps again (one UPDATE added
        one entry, ``iotlb.update.one_entry``); then the range is cleared.
        """
        self._owned()
        size, iova = pages * 0x1000, _SWEEP_IOVA + page * 0x10000
        last = iova + size - 0x1000
        uaddr = self.memory.uaddr
        if not self._update(asid, iova, size, uaddr):
            return
        if not self._update(asid, last, 0x1000, uaddr) and self._refused_by(UPDATE_OVERLAP.rule):
            self.ls.exercised[_MAPS_RANGE_RULE] += 1
        if self._invalidate(asid, iova, 0x1000) and self._update(asid, last, 0x1000, uaddr):
            self.ls.exercised[_ONE_ENTRY_RULE] += 1
        self._invalidate(asid, iova, size)

    @rule(asid=st.sampled_from([0, 1]))
    def iotlb_batch_other_asid(self, asid: int) -> None:
        """A batch begun for one address space, an UPDATE for another (EINVAL with IOTLB_ASID negotiated: a batch
        is one address space's), then the batch ended."""
        self._owned()
        self._set_backend_features(self.ls.model.VHOST_GET_BACKEND_FEATURES())
        other = 1 - asid
        m, c = self.ls.model, self.ls.client
        uaddr = self.memory.uaddr
        self._op("VHOST_IOTLB_BATCH_BEGIN", lambda: m.write_msg(T.VHOST_IOTLB_BATCH_BEGIN, asid),
                 lambda: c.send_iotlb(T.VHOST_IOTLB_BATCH_BEGIN, asid=asid))
        self._update(other, _SWEEP_IOVA - 0x1000, 0x1000, uaddr)
        self._op("VHOST_IOTLB_BATCH_END", lambda: m.write_msg(T.VHOST_IOTLB_BATCH_END, asid),
                 lambda: c.send_iotlb(T.VHOST_IOTLB_BATCH_END, asid=asid))
        self._invalidate(other, _SWEEP_IOVA - 0x1000, 0x1000)

    @rule(page=st.integers(0, 15))
    def iotlb_update_v1(self, page: int) -> None:
        """A v1 ``struct vhost_msg``: no asid word, so address space 0."""
        iova, user = 0x10_0000 + page * 0x1000, self.memory.uaddr + page * 0x1000
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_IOTLB_UPDATE v1",
                 lambda: m.write_msg(T.VHOST_IOTLB_UPDATE, 0, iova, 0x1000, user, 3, version=T.VHOST_IOTLB_MSG),
                 lambda: c.send_iotlb(T.VHOST_IOTLB_UPDATE, iova, 0x1000, user, 3, version=T.VHOST_IOTLB_MSG))

    # ----- the file -----------------------------------------------------------------------------------

    @rule()
    def reopen(self) -> None:
        self.ls.close_and_reopen()
        self.memory = self.ls.new_memory(MEMORY_SIZE)
        self.efd = self.ls.eventfd()

    @invariant()
    def observables_agree(self) -> None:
        self.ls.check_observables()


def control_machine(target: Target, *, lockstep: Lockstep | None = None) -> type[ControlMachine]:
    """A :class:`ControlMachine` subclass bound to ``target`` (its spec probed once, its counters shared)."""
    bound = lockstep if lockstep is not None else Lockstep(target)
    valid, breaking = feature_sets(bound.spec.device_id, bound.spec.device_features)
    name = f"ControlMachine_{target.kind.replace('-', '_')}"
    return type(name, (ControlMachine,), {"lockstep": bound, "valid_features": valid, "breaking_features": breaking})
