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
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vdpacert.conformance.lockstep import Lockstep
from vdpacert.conformance.observe import Value
from vdpacert.conformance.targets import Target
from vdpacert.model import features as feature_rules
from vdpacert.model import z3_features
from vdpacert.model.status import StatusBit
from vdpacert.uapi import vhost_types as T  # noqa: N812

__all__ = ["MEMORY_SIZE", "ControlMachine", "control_machine", "feature_sets"]

#: Guest memory each example maps from (its user addresses are the only backed ones the model knows).
MEMORY_SIZE = 0x10000
_U64_MAX = (1 << 64) - 1
_U32_MAX = 0xFFFFFFFF
#: User addresses no GuestMemory can ever occupy (below mmap_min_addr, in the kernel half).
_UNBACKED = (0x1000, 0xFFFF_8000_0000_0000)
_FEATURE_KINDS = st.sampled_from(["valid", "breaking", "breaking", "subset", "not_offered", "any"])
_INIT = (StatusBit.ACKNOWLEDGE, StatusBit.DRIVER, StatusBit.FEATURES_OK, StatusBit.DRIVER_OK)


@functools.cache
def feature_sets(device_id: int, offered: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(valid sets, sets breaking exactly one MUST rule) of a device's offer, both within 64 bits.

    Valid: for every offered bit, the smallest valid set holding it (Z3's ``complete``), and the
    nearest valid set to the whole offer. Breaking: Z3's ``breaking_sets`` that fit the offer, plus,
    for each dependency of an offered feature, a valid set holding it with one required group
    cleared, kept when exactly one MUST rule then breaks.
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
    breaking = {word for word in z3_features.breaking_sets(device_id).values() if not word & ~offered}
    for dep in feature_rules.dependency_rules(device_id):
        if not offered & feature_rules.mask_of(device_id, dep.feature):
            continue
        for word in valid:
            if not word & feature_rules.mask_of(device_id, dep.feature):
                continue
            for group in dep.requires:
                broken_word = word & ~feature_rules.mask_of(device_id, *group)
                found = feature_rules.violations(device_id, broken_word, offered=offered)
                if [v.rule for v in found if v.level.value == "MUST"] == [dep.rule]:
                    breaking.add(broken_word)
    return tuple(sorted(v for v in valid if v <= _U64_MAX)), tuple(sorted(b for b in breaking if b <= _U64_MAX))


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
        """Start from a fresh open, an owner, or a device brought up to FEATURES_OK or DRIVER_OK (all compared)."""
        if setup == "none":
            return
        self.set_owner()
        if setup == "owner":
            return
        m, c = self.ls.model, self.ls.client
        offer = m.VHOST_GET_BACKEND_FEATURES()
        self._op("VHOST_SET_BACKEND_FEATURES", lambda: m.VHOST_SET_BACKEND_FEATURES(offer),
                 lambda: c.set_backend_features(offer))
        size = min(256, self.ls.spec.vq_num_max)
        for index in range(self.nvqs):  # zeroed rings in mapped memory: a running device finds nothing to do
            self._set_up_vring(index, size)
        for asid in range(self.ls.spec.nas):
            self._map_all(asid)
        if self.valid_features:
            word = data.draw(st.sampled_from(self.valid_features), label="negotiated features")
            self._op("VHOST_SET_FEATURES", lambda: m.VHOST_SET_FEATURES(word), lambda: c.set_features(word))
        self.ls.set_status(int(StatusBit.ACKNOWLEDGE | StatusBit.DRIVER | StatusBit.FEATURES_OK))
        if setup == "driver_ok":
            self.ls.set_status(int(StatusBit.ACKNOWLEDGE | StatusBit.DRIVER | StatusBit.FEATURES_OK
                                   | StatusBit.DRIVER_OK))

    def _set_up_vring(self, index: int, size: int) -> None:
        m, c = self.ls.model, self.ls.client
        desc, avail, used = index * 0x1000, 0x4000 + index * 0x1000, 0x8000 + index * 0x1000
        self._op("VHOST_SET_VRING_NUM", lambda: m.VHOST_SET_VRING_NUM(index, size),
                 lambda: c.set_vring_num(index, size))
        self._op("VHOST_SET_VRING_ADDR", lambda: m.VHOST_SET_VRING_ADDR(index, desc, avail, used),
                 lambda: c.set_vring_addr(index, desc, avail, used))
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
            clause: str = "suite.lockstep.errno") -> None:
        self.ls.op(name, model_call, target_call, clause=clause)

    def _fd(self, choice: str) -> int:
        return {"eventfd": self.efd, "unbind": T.VHOST_FILE_UNBIND, "bad": -2}[choice]

    def _uaddr(self, choice: str, offset: int) -> int:
        if choice == "memory":
            return self.memory.uaddr + offset % MEMORY_SIZE
        if choice == "past_end":
            return self.memory.uaddr + MEMORY_SIZE - 0x10
        return _UNBACKED[offset % len(_UNBACKED)]

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

    def _set_features(self, word: int) -> None:
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_SET_FEATURES", lambda: m.VHOST_SET_FEATURES(word), lambda: c.set_features(word),
                 "suite.lockstep.features")

    @rule(data=st.data(), kind=_FEATURE_KINDS)
    def set_features(self, data: st.DataObject, kind: str) -> None:
        self._set_features(self._draw_features(data, kind))

    @rule(data=st.data(), kind=_FEATURE_KINDS)
    def negotiate(self, data: st.DataObject, kind: str) -> None:
        """Reset, ACKNOWLEDGE, DRIVER, write a feature set, FEATURES_OK: the device must refuse an invalid set."""
        word = self._draw_features(data, kind)
        for status in (0, StatusBit.ACKNOWLEDGE, StatusBit.ACKNOWLEDGE | StatusBit.DRIVER):
            self.ls.set_status(int(status))
        self._set_features(word)
        self.ls.set_status(int(StatusBit.ACKNOWLEDGE | StatusBit.DRIVER | StatusBit.FEATURES_OK))

    @rule(kind=st.sampled_from(["offered", "subset", "unknown"]), word=st.integers(0, _U64_MAX))
    def set_backend_features(self, kind: str, word: int) -> None:
        offer = self.ls.model.VHOST_GET_BACKEND_FEATURES()
        features = offer if kind == "offered" else word & offer if kind == "subset" else word & 0x3FF
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_SET_BACKEND_FEATURES", lambda: m.VHOST_SET_BACKEND_FEATURES(features),
                 lambda: c.set_backend_features(features), "suite.lockstep.features")

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

    # ----- vrings -------------------------------------------------------------------------------------

    def _index(self, data: st.DataObject) -> int:
        return data.draw(st.one_of(st.integers(0, self.nvqs - 1), st.integers(self.nvqs, self.nvqs + 2),
                                   st.just(_U32_MAX)), label="vring index")

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

    # ----- config, callbacks, log ---------------------------------------------------------------------

    @rule(offset=st.one_of(st.integers(0, 128), st.just(_U32_MAX)),
          length=st.one_of(st.integers(0, 128), st.just(0x1000)))
    def get_config(self, offset: int, length: int) -> None:
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_VDPA_GET_CONFIG", lambda: m.VHOST_VDPA_GET_CONFIG(offset, length),
                 lambda: c.get_config(offset, length), "suite.lockstep.config")

    @rule(offset=st.integers(0, 128), data=st.binary(min_size=0, max_size=16))
    def set_config(self, offset: int, data: bytes) -> None:
        self.ls.set_config(offset, data)

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
        iova = 0x10_0000 + page * 0x1000
        size = {"pages": max(1, pages) * 0x1000, "zero": 0, "wrap": _U64_MAX, "odd": 0x801}[size_kind]
        user = self._uaddr(uaddr, page * 0x1000)
        m, c = self.ls.model, self.ls.client
        self._op("VHOST_IOTLB_UPDATE", lambda: m.write_msg(T.VHOST_IOTLB_UPDATE, asid, iova, size, user, perm),
                 lambda: c.send_iotlb(T.VHOST_IOTLB_UPDATE, iova, size, user, perm, asid=asid))

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
