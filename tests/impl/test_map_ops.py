"""One way of mapping per device, and the vhost-vdpa front following Linux's choice (issue 7, an IOTLB fuzzer find).

vdpa.h has a parent provide ``set_map`` or ``dma_map`` / ``dma_unmap`` (the model's rule
``vdpa_device.map_op``); vdpa_sim registers one of two ops tables per device by its ``batch_mapping``
parameter. The reference devices used to expose both, and the front then mixed them: an UPDATE went
through dma_map while an INVALIDATE or BATCH_END re-sent the whole map through set_map, so after a
clean-map reset one INVALIDATE handed the device back every entry the reset had dropped.

Every case runs on sim-net and sim-blk, in both styles, with the parent's map calls recorded by a
subclass that passes each call on to the real device, and (where the model says what the device must
hold) with :class:`~vdpacert.model.vhost_vdpa.VhostVdpaModel` driven through the same messages.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from vdpacert.impl.bus import VdpaBus, load_mgmtdevs
from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.iotlb import Iotlb
from vdpacert.impl.parent import VDPA_RESET_F_CLEAN_MAP, VdpaParent, check_parent, has_op, map_style
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import DEFAULT_MAX_IOTLB_ENTRIES, SimDevice
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa, pack_iotlb_msg
from vdpacert.model.vdpa_device import VdpaDeviceSpec
from vdpacert.model.vhost_vdpa import IotlbMessageError, VhostVdpaModel
from vdpacert.uapi import vhost_types as T  # noqa: N812

try:
    from .ring_driver import Guest
    from .test_e2e_vhost import CAPACITY, BlkCase, NetCase
except ImportError:
    from ring_driver import Guest
    from test_e2e_vhost import CAPACITY, BlkCase, NetCase

RW = T.VHOST_ACCESS_RW
#: IOTLB v2 messages, batches and address-space ids; no IOTLB_PERSIST, so a reset cleans the device's maps.
BACKEND = sum(1 << bit for bit in (T.VHOST_BACKEND_F_IOTLB_MSG_V2, T.VHOST_BACKEND_F_IOTLB_BATCH,
                                   T.VHOST_BACKEND_F_IOTLB_ASID))
MAP_OPS = ("set_map", "dma_map", "dma_unmap")
STYLES = ("set_map", "dma_map")
PAGE = 0x1000
Entry = tuple[int, int, int, int]


class _Recording(SimDevice):
    """Records every map-related call (made or refused), then lets the real device answer it."""

    calls: list[tuple[Any, ...]]

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        self.calls.append(("set_map", asid, tuple(iotlb.entries())))
        super().set_map(asid, iotlb)

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        self.calls.append(("dma_map", asid, iova, size))
        super().dma_map(asid, iova, size, uaddr, perm)

    def dma_unmap(self, asid: int, iova: int, size: int) -> None:
        self.calls.append(("dma_unmap", asid, iova, size))
        super().dma_unmap(asid, iova, size)

    def compat_reset(self, flags: int) -> None:
        self.calls.append(("compat_reset", flags))
        super().compat_reset(flags)

    def map_calls(self) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] in MAP_OPS]


class RecNet(_Recording, SimNet):
    pass


class RecBlk(_Recording, SimBlk):
    pass


def make(kind: str, style: str | None, **attrs: Any) -> SimNet | SimBlk:
    """A recording sim-net or sim-blk; ``style`` None leaves batch_mapping at its default."""
    batch = None if style is None else style == "set_map"
    dev: SimNet | SimBlk
    if kind == "sim-net":
        dev = RecNet("vdpa0", batch_mapping=batch, **attrs)
    else:
        dev = RecBlk("vdpa0", capacity=attrs.pop("capacity", 8), batch_mapping=batch, **attrs)
    dev.calls = []  # type: ignore[attr-defined]
    return dev


def recorded(dev: SimDevice) -> list[tuple[Any, ...]]:
    assert isinstance(dev, _Recording)
    return dev.map_calls()


@pytest.fixture(params=["sim-net", "sim-blk"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def memory() -> Iterator[tuple[MemoryRegistry, GuestMemory]]:
    registry = MemoryRegistry()
    mem = GuestMemory(1 << 16, gpa=0, register=False)
    registry.add(mem)
    yield registry, mem
    mem.close()


class Pair:
    """One device behind the front, and the model of it with the device's mapping style, message by message."""

    def __init__(self, dev: SimNet | SimBlk, style: str, memory: tuple[MemoryRegistry, GuestMemory]) -> None:
        registry, self.mem = memory
        self.dev = dev
        self.front = VhostVdpa(dev, registry)
        self.front.set_owner()
        self.front.set_backend_features(BACKEND)
        limit = dev.max_iotlb_entries or None
        spec = VdpaDeviceSpec(device_id=dev.get_device_id(), device_features=dev.get_device_features(),
                              nvqs=dev.nvqs, ngroups=dev.ngroups, nas=dev.nas, map_op=style,  # type: ignore[arg-type]
                              iotlb_limit=limit)
        self.model = VhostVdpaModel(spec)
        self.model.open()
        self.model.VHOST_SET_OWNER()
        self.model.VHOST_SET_BACKEND_FEATURES(BACKEND)
        self.model.set_user_memory([(self.mem.uaddr, self.mem.size)])

    def msg(self, msg_type: int, iova: int = 0, size: int = 0, offset: int = 0) -> tuple[int, int]:
        """One message to both; the answer ``(errno, cause errno)``, (0, 0) when accepted, the same on both."""
        uaddr = self.mem.uaddr + offset if msg_type == T.VHOST_IOTLB_UPDATE else 0
        perm = RW if msg_type == T.VHOST_IOTLB_UPDATE else 0
        got = want = (0, 0)
        try:
            self.front.write(pack_iotlb_msg(msg_type, iova, size, uaddr, perm))
        except OSError as error:
            cause = error.__cause__
            got = (error.errno or 0, cause.errno if isinstance(cause, OSError) and cause.errno else 0)
        try:
            self.model.write_msg(msg_type, 0, iova, size, uaddr, perm)
        except IotlbMessageError as error:
            want = (error.errno, error.cause.errno)
        assert got == want, f"message {msg_type} [{iova:#x} +{size:#x}]: front {got}, model {want}"
        self.check()
        return got

    def update(self, iova: int, size: int = PAGE, offset: int = 0) -> tuple[int, int]:
        return self.msg(T.VHOST_IOTLB_UPDATE, iova, size, offset)

    def invalidate(self, iova: int, size: int = PAGE) -> tuple[int, int]:
        return self.msg(T.VHOST_IOTLB_INVALIDATE, iova, size)

    def reset(self) -> None:
        self.front.set_status(0)
        self.model.VHOST_VDPA_SET_STATUS(0)
        self.check()

    def device_map(self, asid: int = 0) -> list[Entry]:
        return self.dev.address_space(asid).entries()

    def record(self, asid: int = 0) -> list[Entry]:
        """What the front (vhost-vdpa's own iotlb) holds for ``asid``."""
        return self.front.address_spaces().get(asid, [])

    def check(self) -> None:
        """The device holds what the model's device holds, in every address space."""
        for asid in range(self.dev.nas):
            model = [(m.start, m.last, m.uaddr, m.perm) for m in self.model.device.iotlb(asid).maps]
            assert self.device_map(asid) == model, f"asid {asid}"

    def close(self) -> None:
        self.front.close()


def entry(pair: Pair, iova: int, offset: int = 0, size: int = PAGE) -> Entry:
    return (iova, iova + size - 1, pair.mem.uaddr + offset, RW)


# ----- one style per device -------------------------------------------------------------------------------


def test_a_device_exposes_exactly_one_mapping_style(kind: str, style: str,
                                                     memory: tuple[MemoryRegistry, GuestMemory]) -> None:
    dev = make(kind, style)
    assert (has_op(dev, "set_map"), has_op(dev, "dma_map"), has_op(dev, "dma_unmap")) == (
        (True, False, False) if style == "set_map" else (False, True, True))
    assert map_style(dev) == style and dev.batch_mapping == (style == "set_map")
    # The withheld ops are refused when called directly, and change nothing.
    iotlb = Iotlb()
    iotlb.update(0, PAGE, memory[1].uaddr, RW)
    withheld = [lambda: dev.dma_map(0, 0, PAGE, memory[1].uaddr, RW), lambda: dev.dma_unmap(0, 0, PAGE)]
    if style == "dma_map":
        withheld = [lambda: dev.set_map(0, iotlb)]
    for call in withheld:
        with pytest.raises(OSError) as refused:
            call()
        assert refused.value.errno == errno.EOPNOTSUPP
    assert dev.address_space(0).entries() == []
    front = VhostVdpa(dev, memory[0])
    try:
        assert front.map_style == style
    finally:
        front.close()


def test_the_default_is_vdpa_sims_set_map_and_a_class_without_it_keeps_dma_map() -> None:
    assert map_style(SimNet("n")) == map_style(SimBlk("b", capacity=8)) == "set_map"
    assert SimNet("n").max_iotlb_entries == DEFAULT_MAX_IOTLB_ENTRIES
    no_set_map = type("NoSetMap", (SimBlk,), {"set_map": VdpaParent.set_map})
    assert map_style(no_set_map("b", capacity=8)) == "dma_map"  # what the fuzzers' dma_map_only builds
    with pytest.raises(ValueError, match="needs set_map"):
        no_set_map("b", capacity=8, batch_mapping=True)
    no_dma_map = type("NoDmaMap", (SimBlk,), {"dma_map": VdpaParent.dma_map, "dma_unmap": VdpaParent.dma_unmap})
    with pytest.raises(ValueError, match="needs dma_map"):
        no_dma_map("b", capacity=8, batch_mapping=False)
    bad = SimBlk("b", capacity=8)
    bad.withheld_ops = frozenset({"dma_map", "no_such_op"})
    with pytest.raises(ValueError, match="withheld_ops"):
        check_parent(bad)


def test_management_device_attributes_choose_the_style_and_the_cap() -> None:
    bus = VdpaBus()
    load_mgmtdevs(bus)
    for mgmtdev in ("sim-net", "sim-blk"):
        assert {"batch_mapping", "max_iotlb_entries"} <= set(bus.mgmtdev_show(mgmtdev)[0]["supported_attrs"])
    assert map_style(bus.dev_add("a", "sim-net").parent) == "set_map"
    assert map_style(bus.dev_add("b", "sim-net", batch_mapping=0).parent) == "dma_map"
    blk = bus.dev_add("c", "sim-blk", batch_mapping="1", max_iotlb_entries="4", capacity=8).parent
    assert map_style(blk) == "set_map" and isinstance(blk, SimBlk) and blk.max_iotlb_entries == 4
    assert map_style(bus.dev_add("d", "sim-blk", batch_mapping=False, capacity=8).parent) == "dma_map"
    for bad in ({"batch_mapping": 2}, {"batch_mapping": "yes"}, {"max_iotlb_entries": -1}):
        with pytest.raises(OSError) as refused:
            bus.dev_add("e", "sim-net", **bad)
        assert refused.value.errno == errno.EINVAL, bad


# ----- what reaches the device ----------------------------------------------------------------------------


def test_update_invalidate_and_batches_reach_the_device_one_way(kind: str, style: str,
                                                                memory: tuple[MemoryRegistry, GuestMemory]) -> None:
    pair = Pair(make(kind, style), style, memory)
    try:
        a, b, c, d = 0x1000, 0x3000, 0x5000, 0x7000
        pair.update(a)
        pair.update(b, offset=PAGE)
        pair.invalidate(a)
        pair.msg(T.VHOST_IOTLB_BATCH_BEGIN)
        pair.update(c, offset=2 * PAGE)
        pair.update(d, offset=3 * PAGE)
        pair.invalidate(b)
        in_batch = recorded(pair.dev)
        pair.msg(T.VHOST_IOTLB_BATCH_END)
        ea, eb, ec, ed = (entry(pair, iova, n * PAGE) for n, iova in enumerate((a, b, c, d)))
        if style == "set_map":
            # The whole space after each message outside a batch; nothing inside it; all of it at BATCH_END.
            assert recorded(pair.dev) == [("set_map", 0, (ea,)), ("set_map", 0, (ea, eb)), ("set_map", 0, (eb,)),
                                          ("set_map", 0, (ec, ed))]
            assert len(in_batch) == 3
        else:
            # Range by range, at once, batch or not; BATCH_END sends nothing.
            assert recorded(pair.dev) == [("dma_map", 0, a, PAGE), ("dma_map", 0, b, PAGE), ("dma_unmap", 0, a, PAGE),
                                          ("dma_map", 0, c, PAGE), ("dma_map", 0, d, PAGE), ("dma_unmap", 0, b, PAGE)]
        assert pair.device_map() == pair.record() == [ec, ed]
    finally:
        pair.close()


def test_clean_map_reset_then_invalidate_hands_back_nothing_stale(kind: str, style: str,
                                                                  memory: tuple[MemoryRegistry, GuestMemory]) -> None:
    """After a reset that cleaned the device's maps, invalidating a stale entry gives the device nothing of it.

    With dma_map the device gets a dma_unmap only and stays empty. With set_map it gets vhost-vdpa's own
    record after the invalidation, as vhost_vdpa_unmap sends it: the entry userspace still has mapped (b),
    never the invalidated one. The model predicts both (Pair.check after every step).
    """
    pair = Pair(make(kind, style), style, memory)
    try:
        a, b = 0x1000, 0x3000
        pair.update(a)
        pair.update(b, offset=PAGE)
        before = len(recorded(pair.dev))
        pair.reset()
        assert ("compat_reset", VDPA_RESET_F_CLEAN_MAP) in pair.dev.calls  # type: ignore[attr-defined]
        assert pair.device_map() == [] and len(pair.record()) == 2  # vhost-vdpa keeps its record
        pair.invalidate(a)
        after = recorded(pair.dev)[before:]
        assert entry(pair, a) not in pair.device_map()
        if style == "dma_map":
            assert after == [("dma_unmap", 0, a, PAGE)]
            assert pair.device_map() == []
        else:
            assert after == [("set_map", 0, (entry(pair, b, PAGE),))]
            assert pair.device_map() == pair.record() == [entry(pair, b, PAGE)]
    finally:
        pair.close()


class _BothStyles(RecNet):
    """A parent that (against vdpa_device.map_op) exposes set_map and dma_map / dma_unmap at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.withheld_ops = frozenset()
        self.calls = []


def test_a_parent_exposing_both_gets_dma_map_only(memory: tuple[MemoryRegistry, GuestMemory]) -> None:
    """Linux's precedence: dma_map when present. The fuzzer's find, replayed: no set_map ever re-sends the
    front's record, so the clean-map reset's victims stay gone."""
    pair = Pair(_BothStyles("vdpa0"), "dma_map", memory)
    try:
        assert pair.front.map_style == "dma_map"
        pair.update(0x1000)
        pair.update(0x3000, offset=PAGE)
        pair.reset()
        pair.invalidate(0x1000)
        pair.msg(T.VHOST_IOTLB_BATCH_BEGIN)
        pair.update(0x5000)
        pair.msg(T.VHOST_IOTLB_BATCH_END)
        assert [call[0] for call in recorded(pair.dev)] == ["dma_map", "dma_map", "dma_unmap", "dma_map"]
        assert pair.device_map() == [entry(pair, 0x5000)]
    finally:
        pair.close()


# ----- the entry limit ------------------------------------------------------------------------------------

ENOSPC = (errno.EFAULT, errno.ENOSPC)
OK = (0, 0)


def test_entry_limit_answers_enospc_alike_in_both_styles(kind: str, memory: tuple[MemoryRegistry, GuestMemory]) -> None:
    """Cap 4: under and at it an UPDATE is taken, over it EFAULT (cause ENOSPC) and nothing changes, in both
    styles and as the model says; an invalidation makes room again."""
    results = {}
    for style in STYLES:
        pair = Pair(make(kind, style, max_iotlb_entries=4), style, memory)
        try:
            answers = [pair.update(0x1000 * (2 * i + 1), offset=i * PAGE) for i in range(4)]  # under, at
            before = (pair.record(), pair.device_map())
            answers.append(pair.update(0x20_000))  # over
            assert (pair.record(), pair.device_map()) == before
            answers.append(pair.invalidate(0x1000))
            answers.append(pair.update(0x20_000))
            answers.append(pair.update(0x30_000))
            results[style] = (answers, pair.device_map())
        finally:
            pair.close()
    assert results["set_map"] == results["dma_map"]
    assert results["set_map"][0] == [OK, OK, OK, OK, ENOSPC, OK, OK, ENOSPC]


def test_entry_limit_inside_a_batch_follows_each_style(kind: str, memory: tuple[MemoryRegistry, GuestMemory]) -> None:
    """Where Linux's two paths differ, each style does what vhost-vdpa does and the model predicts: set_map
    learns of the cap at BATCH_END, whose result vhost-vdpa ignores (the device keeps its old map); dma_map
    refuses the UPDATE over the cap at once."""
    for style in STYLES:
        pair = Pair(make(kind, style, max_iotlb_entries=2), style, memory)
        try:
            pair.update(0x1000)
            pair.msg(T.VHOST_IOTLB_BATCH_BEGIN)
            pair.update(0x3000, offset=PAGE)
            over = pair.update(0x5000, offset=2 * PAGE)
            pair.msg(T.VHOST_IOTLB_BATCH_END)
            if style == "set_map":
                assert over == OK and len(pair.record()) == 3
                assert pair.device_map() == [entry(pair, 0x1000)]
                error = pair.front.last_ignored_error
                assert isinstance(error, OSError) and error.errno == errno.ENOSPC
            else:
                assert over == ENOSPC and len(pair.record()) == 2
                assert pair.device_map() == pair.record()
        finally:
            pair.close()


# ----- traffic ----------------------------------------------------------------------------------------------


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(4 << 20)
    yield g
    g.close()


def test_traffic_flows_in_both_styles_and_after_a_batched_remap(kind: str, style: str, guest: Guest) -> None:
    case = NetCase() if kind == "sim-net" else BlkCase()
    dev = make(kind, style, max_vq_pairs=2) if kind == "sim-net" else make(kind, style, capacity=CAPACITY)
    rig = case.open(guest, dev, False)
    try:
        case.submit(rig, [0, 1, 2])  # type: ignore[arg-type]
        assert case.completed(rig) == [0, 1, 2]  # type: ignore[arg-type]
        front = rig.front
        front.iotlb_batch_begin()
        front.iotlb_invalidate(guest.iova_base, guest.size)
        front.iotlb_update(guest.iova_base, guest.size, guest.mem.uaddr, RW)
        front.iotlb_batch_end()
        case.submit(rig, [3, 4])  # type: ignore[arg-type]
        assert case.completed(rig) == [3, 4]  # type: ignore[arg-type]
        names = {call[0] for call in recorded(dev)}
        assert names == ({"set_map"} if style == "set_map" else {"dma_map", "dma_unmap"})
        assert dev.address_space(0).entries() == [(guest.iova_base, guest.iova_base + guest.size - 1,
                                                   guest.mem.uaddr, RW)]
    finally:
        rig.close()
