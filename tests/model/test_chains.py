"""The chain walker, the bad-input table, and the guest memory / translator it reads through."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vdpacert.model.chains import (
    BAD_INPUTS,
    DEVICE_OBLIGATIONS,
    MAX_CHAIN_BYTES,
    BadInput,
    Chain,
    ChainFault,
    Layout,
    Reaction,
)
from vdpacert.model.guest_memory import (
    IDENTITY,
    AccessFault,
    FaultReason,
    ModelMemory,
    Perm,
    RangeTranslator,
    Translator,
)
from vdpacert.model.ring_index import PackedVqState
from vdpacert.model.spec import Level, LinuxSource, Section
from vdpacert.model.vring_packed import (
    PackedDeviceModel,
    PackedRing,
    avail_flags,
    write_packed_desc,
)
from vdpacert.model.vring_split import SplitDeviceModel, SplitRing, write_split_desc
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

INDIRECT = 1 << VIRTIO_RING_F_INDIRECT_DESC
NEXT, WRITE, IND = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
NUM = 4
RING = SplitRing(NUM, 0x1000, 0x2000, 0x3000)
PRING = PackedRing(NUM, 0x1000, 0x2000, 0x2010)
TABLE = 0x8000
BUF = 0x10000


# --- guest memory and translators -------------------------------------------------------------


def test_memory_is_sparse_little_endian_and_reads_zero_where_unwritten() -> None:
    mem = ModelMemory()
    mem.write_u64(4094, 0x0102030405060708)  # crosses a page boundary
    assert mem.read(4094, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert mem.read_u16(4094) == 0x0708 and mem.read_u32(4098) == 0x01020304
    assert mem.read((1 << 64) - 4, 4) == bytes(4)
    with pytest.raises(ValueError):
        mem.read((1 << 64) - 2, 4)
    with pytest.raises(ValueError):
        mem.write_u16(0, 1 << 16)


def test_range_translator_checks_coverage_permission_and_contiguity() -> None:
    tr = RangeTranslator()
    tr.map(0x1000, 0x1000, 0x9000, Perm.RO)
    tr.map(0x2000, 0x1000, 0xA000, Perm.RO)  # continues the first in both spaces
    tr.map(0x3000, 0x1000, 0x0, Perm.WO)  # not contiguous with the second
    assert tr.translate(0x1800, 0x1000, write=False) == 0x9800
    fault = tr.translate(0x1800, 0x10, write=True)
    assert isinstance(fault, AccessFault) and fault.reason is FaultReason.PERMISSION
    fault = tr.translate(0x4000, 1, write=False)
    assert isinstance(fault, AccessFault) and fault.reason is FaultReason.UNMAPPED
    fault = tr.translate(0x2800, 0x1000, write=False)
    assert isinstance(fault, AccessFault) and fault.reason is FaultReason.PERMISSION  # WO entry
    tr2 = RangeTranslator()
    tr2.map(0x0, 0x1000, 0x5000, Perm.RW)
    tr2.map(0x1000, 0x1000, 0x0, Perm.RW)
    fault = tr2.translate(0x800, 0x1000, write=False)
    assert isinstance(fault, AccessFault) and fault.reason is FaultReason.NOT_CONTIGUOUS
    assert tr.translate(0x3000, 0x10, write=True) == 0x0
    assert isinstance(IDENTITY.translate((1 << 64) - 1, 2, write=False), AccessFault)


# --- the table ---------------------------------------------------------------------------------


def test_every_bad_input_has_a_cited_row_that_allows_stopping_the_queue() -> None:
    assert set(BAD_INPUTS) == set(BadInput)
    for bad, row in BAD_INPUTS.items():
        assert row.bad is bad
        assert row.level is Level.MUST
        assert row.citations and all(isinstance(c, (Section, LinuxSource)) for c in row.citations)
        assert Reaction.NEEDS_RESET in row.device_may
        assert row.layouts
    assert BAD_INPUTS[BadInput.INDEX_OUT_OF_RANGE].layouts == {Layout.SPLIT}
    assert BAD_INPUTS[BadInput.DESC_NOT_AVAILABLE].layouts == {Layout.PACKED}
    assert any(o.level is Level.MUST and "device-readable" in o.summary for o in DEVICE_OBLIGATIONS)


# --- every class detected ----------------------------------------------------------------------


def _split(mem: ModelMemory, head: int = 0, *, features: int = INDIRECT, translator: Translator = IDENTITY,
           avail_idx: int = 1) -> Chain | ChainFault | None:
    mem.write_u16(RING.avail_entry(0), head)
    mem.write_u16(RING.avail_idx, avail_idx)
    return SplitDeviceModel(mem, RING, features=features, translator=translator).peek()


def _d(mem: ModelMemory, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    write_split_desc(mem, RING.desc_entry(i), addr, length, flags, nxt)


def _t(mem: ModelMemory, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    write_split_desc(mem, TABLE + 16 * i, addr, length, flags, nxt)


def loop(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, BUF, 8, NEXT, 1)
    _d(mem, 1, BUF, 8, NEXT, 0)
    return _split(mem)


def too_long(mem: ModelMemory) -> Chain | ChainFault | None:
    for i in range(NUM + 1):
        _t(mem, i, BUF, 8, NEXT, i + 1)
    _d(mem, 0, TABLE, 16 * (NUM + 2), IND)
    return _split(mem)


def nested(mem: ModelMemory) -> Chain | ChainFault | None:
    _t(mem, 0, TABLE + 0x100, 16, IND)
    _d(mem, 0, TABLE, 16, IND)
    return _split(mem)


def not_multiple(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, TABLE, 24, IND)
    return _split(mem)


def zero_len(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, TABLE, 0, IND)
    return _split(mem)


def not_negotiated(mem: ModelMemory) -> Chain | ChainFault | None:
    _t(mem, 0, BUF, 8)
    _d(mem, 0, TABLE, 16, IND)
    return _split(mem, features=0)


def in_chain(mem: ModelMemory) -> Chain | ChainFault | None:
    _t(mem, 0, BUF, 8)
    _d(mem, 0, TABLE, 16, IND | NEXT, 1)
    _d(mem, 1, BUF, 8)
    return _split(mem)


def _iotlb(perm: Perm) -> RangeTranslator:
    tr = RangeTranslator()
    tr.map(0x0, 0x8000, perm=Perm.RO)  # the rings
    tr.map(BUF, 0x1000, perm=perm)
    return tr


def unmapped(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, BUF + 0x2000, 8)
    return _split(mem, translator=_iotlb(Perm.RW))


def permission(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, BUF, 8, WRITE)
    return _split(mem, translator=_iotlb(Perm.RO))


def overflow(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, BUF, 0xFFFF_FFFF, NEXT, 1)
    _d(mem, 1, BUF, 2)
    return _split(mem)


def read_after_write(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, BUF, 8, WRITE | NEXT, 1)
    _d(mem, 1, BUF, 8)
    return _split(mem)


def next_out_of_range(mem: ModelMemory) -> Chain | ChainFault | None:
    _d(mem, 0, BUF, 8, NEXT, NUM)
    return _split(mem)


def head_out_of_range(mem: ModelMemory) -> Chain | ChainFault | None:
    return _split(mem, head=NUM)


def avail_ahead(mem: ModelMemory) -> Chain | ChainFault | None:
    return _split(mem, avail_idx=NUM + 1)


def not_available(mem: ModelMemory) -> Chain | ChainFault | None:
    write_packed_desc(mem, PRING.slot(0), BUF, 8, 0, NEXT | avail_flags(1))
    write_packed_desc(mem, PRING.slot(1), BUF, 8, 0, avail_flags(0))  # last pass's marking
    return PackedDeviceModel(mem, PRING).peek()


def packed_too_long(mem: ModelMemory) -> Chain | ChainFault | None:
    for i in range(NUM):
        write_packed_desc(mem, PRING.slot(i), BUF, 8, 0, NEXT | avail_flags(1))
    return PackedDeviceModel(mem, PRING).peek()


def packed_in_chain(mem: ModelMemory) -> Chain | ChainFault | None:
    write_packed_desc(mem, TABLE, BUF, 8, 0, 0)
    write_packed_desc(mem, PRING.slot(0), BUF, 8, 0, NEXT | avail_flags(1))
    write_packed_desc(mem, PRING.slot(1), TABLE, 16, 0, IND | avail_flags(1))
    return PackedDeviceModel(mem, PRING, features=INDIRECT).peek()


CASES: list[tuple[BadInput, Callable[[ModelMemory], Chain | ChainFault | None]]] = [
    (BadInput.DESCRIPTOR_LOOP, loop),
    (BadInput.CHAIN_TOO_LONG, too_long),
    (BadInput.CHAIN_TOO_LONG, packed_too_long),
    (BadInput.NESTED_INDIRECT, nested),
    (BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16, not_multiple),
    (BadInput.ZERO_LENGTH_INDIRECT, zero_len),
    (BadInput.INDIRECT_NOT_NEGOTIATED, not_negotiated),
    (BadInput.INDIRECT_IN_CHAIN, in_chain),
    (BadInput.INDIRECT_IN_CHAIN, packed_in_chain),
    (BadInput.ADDRESS_UNMAPPED, unmapped),
    (BadInput.ADDRESS_PERMISSION, permission),
    (BadInput.TOTAL_LENGTH_OVERFLOW, overflow),
    (BadInput.READABLE_AFTER_WRITABLE, read_after_write),
    (BadInput.INDEX_OUT_OF_RANGE, next_out_of_range),
    (BadInput.INDEX_OUT_OF_RANGE, head_out_of_range),
    (BadInput.AVAIL_IDX_AHEAD, avail_ahead),
    (BadInput.DESC_NOT_AVAILABLE, not_available),
]


def test_cases_cover_every_class() -> None:
    assert {bad for bad, _ in CASES} == set(BadInput)


@pytest.mark.parametrize(("bad", "build"), CASES, ids=[f"{b.name}-{f.__name__}" for b, f in CASES])
def test_each_bad_input_is_detected_as_its_class(
    bad: BadInput, build: Callable[[ModelMemory], Chain | ChainFault | None]
) -> None:
    result = build(ModelMemory())
    assert isinstance(result, ChainFault), result
    assert result.bad is bad, str(result)
    assert result.row is BAD_INPUTS[bad] and str(result)


def test_total_length_of_exactly_2_to_the_32_is_allowed() -> None:
    mem = ModelMemory()
    _d(mem, 0, BUF, 0xFFFF_FFFF, NEXT, 1)
    _d(mem, 1, BUF, 1)
    chain = _split(mem)
    assert isinstance(chain, Chain) and chain.total_len == MAX_CHAIN_BYTES


def test_split_chain_may_end_in_an_indirect_descriptor() -> None:
    mem = ModelMemory()
    _t(mem, 0, BUF + 0x100, 4, WRITE)
    _d(mem, 0, BUF, 8, NEXT, 1)
    _d(mem, 1, TABLE, 16, IND | WRITE)  # WRITE on the indirect descriptor is ignored
    chain = _split(mem)
    assert isinstance(chain, Chain) and chain.indirect and chain.descriptors == 2
    assert [(s.addr, s.len, s.writable) for s in chain.segments] == [(BUF, 8, False), (BUF + 0x100, 4, True)]


def test_packed_indirect_table_ignores_every_flag_but_write() -> None:
    mem = ModelMemory()
    write_packed_desc(mem, TABLE, BUF, 8, 0, IND | NEXT)  # reserved there, ignored by the device
    write_packed_desc(mem, TABLE + 16, BUF + 8, 8, 0, WRITE)
    write_packed_desc(mem, PRING.slot(0), TABLE, 32, 7, IND | avail_flags(1))
    chain = PackedDeviceModel(mem, PRING, features=INDIRECT).peek()
    assert isinstance(chain, Chain) and chain.id == 7 and chain.descriptors == 1
    assert [(s.addr, s.writable) for s in chain.segments] == [(BUF, False), (BUF + 8, True)]


# --- hostile ring contents ------------------------------------------------------------------------

REGION = 0x4000  # random descriptors live here and in the ring
ADDRS = st.sampled_from([0, BUF, REGION, REGION + 8, REGION + 16, RING.desc, (1 << 64) - 8]) | st.integers(
    0, (1 << 64) - 1)
LENS = st.sampled_from([0, 1, 16, 24, 32, 48, 0xFFFF_FFFF]) | st.integers(0, (1 << 32) - 1)
DESCS = st.tuples(ADDRS, LENS, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
SMALL_FLAGS = st.integers(0, 7)


def _desc_bytes(addr: int, length: int, a: int, b: int) -> bytes:
    return addr.to_bytes(8, "little") + length.to_bytes(4, "little") + a.to_bytes(2, "little") + b.to_bytes(
        2, "little")


PACKED_FLAGS = st.sampled_from([0x80, 0x8000, 0x81, 0x82, 0x83, 0x84, 0x85, 0x8081, 0x8002])


@st.composite
def hostile_blob(draw: st.DrawFn, entries: int, packed: bool = False) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(min_size=16 * entries, max_size=16 * entries))
    parts = []
    for _ in range(entries):
        addr, length, _, b = draw(DESCS)
        if packed:
            parts.append(_desc_bytes(addr, length, b, draw(PACKED_FLAGS | st.integers(0, 0xFFFF))))
        else:
            flags = draw(SMALL_FLAGS | st.integers(0, 0xFFFF))
            parts.append(_desc_bytes(addr, length, flags, b % (NUM + 2)))
    return b"".join(parts)


def _writable_candidates(mem: ModelMemory, regions: list[tuple[int, int]], packed: bool) -> set[tuple[int, int]]:
    """Every (addr, len) any 16 bytes overlapping the random regions say is device-writable."""
    found = set()
    for start, size in regions:
        for at in range(max(0, start - 15), start + size):
            raw = mem.read(at, 16)
            flags = int.from_bytes(raw[14:16] if packed else raw[12:14], "little")
            if flags & WRITE:
                found.add((int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:12], "little")))
    return found


TRANSLATORS = st.sampled_from(["identity", "partial"])


def _translator(kind: str) -> Translator:
    if kind == "identity":
        return IDENTITY
    tr = RangeTranslator()
    tr.map(0, 0x6000, perm=Perm.RO)
    tr.map(BUF, 0x100, perm=Perm.WO)
    return tr


AVAIL = st.binary(min_size=12, max_size=12) | st.builds(
    lambda idx, heads: b"\0\0" + idx.to_bytes(2, "little") + b"".join(h.to_bytes(2, "little") for h in heads),
    st.integers(1, NUM), st.lists(st.integers(0, NUM), min_size=NUM + 1, max_size=NUM + 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=hostile_blob(NUM), extra=hostile_blob(4), avail=AVAIL,
       features=st.sampled_from([0, INDIRECT]), kind=TRANSLATORS)
def test_split_walker_survives_any_ring_contents(table: bytes, extra: bytes, avail: bytes, features: int,
                                                 kind: str) -> None:
    mem = ModelMemory()
    mem.write(RING.desc, table)
    mem.write(REGION, extra)
    mem.write(RING.avail, avail)
    device = SplitDeviceModel(mem, RING, features=features, translator=_translator(kind))
    for _ in range(3):
        result = device.consume()
        assert result is None or isinstance(result, (Chain, ChainFault))
        event(result.bad.name if isinstance(result, ChainFault) else type(result).__name__)
        if not isinstance(result, Chain):
            break
        allowed = _writable_candidates(mem, [(RING.desc, 16 * NUM), (REGION, 64)], packed=False)
        assert all((s.addr, s.len) in allowed for s in result.writable)
        assert result.total_len <= MAX_CHAIN_BYTES and 1 <= result.descriptors <= NUM
        assert all(w.iova >= 0 for w in device.may_write())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=hostile_blob(NUM, packed=True), extra=hostile_blob(4, packed=True), features=st.sampled_from([0, INDIRECT]),
       kind=TRANSLATORS, start=st.integers(0, NUM - 1), wrap=st.integers(0, 1),
       head_flags=st.none() | st.integers(0, 7))
def test_packed_walker_survives_any_ring_contents(ring: bytes, extra: bytes, features: int, kind: str,
                                                  start: int, wrap: int, head_flags: int | None) -> None:
    mem = ModelMemory()
    mem.write(PRING.desc, ring)
    if head_flags is not None:  # make the first slot available more often than chance would
        mem.write_u16(PRING.slot(start) + 14, head_flags | avail_flags(wrap))
    mem.write(REGION, extra)
    state = PackedVqState(start, wrap, start, wrap)
    device = PackedDeviceModel(mem, PRING, features=features, translator=_translator(kind), state=state)
    for _ in range(3):
        result = device.consume()
        assert result is None or isinstance(result, (Chain, ChainFault))
        event(result.bad.name if isinstance(result, ChainFault) else type(result).__name__)
        if not isinstance(result, Chain):
            break
        allowed = _writable_candidates(mem, [(PRING.desc, 16 * NUM), (REGION, 64)], packed=True)
        assert all((s.addr, s.len) in allowed for s in result.writable)
        assert result.total_len <= MAX_CHAIN_BYTES and 1 <= result.descriptors <= NUM
