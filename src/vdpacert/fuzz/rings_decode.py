"""Turn any byte string into one :class:`~vdpacert.fuzz.rings_layout.RingInput` (the ring fuzzer's decoder).

The order of choices: device and queue, ring format and features, queue size and start position,
raw indirect tables, the chains (each honest or raw), stray descriptor writes, the available
ring (split) or the available descriptors (packed) in one or two publish stages, the honest
chains of the partner queue, and patches over the buffer area. Every choice is read with
:class:`~vdpacert.fuzz.base.ByteReader`, so every input decodes; the early choices take one byte
each, so a mutation engine flipping a byte near the front changes the shape of the whole input.
"""

from __future__ import annotations

from vdpacert.fuzz.base import ByteReader
from vdpacert.fuzz.rings_layout import (
    AVAIL,
    BUF_AREA,
    BUF_SIZE,
    FUZZ_CELLS,
    FUZZ_DESC,
    FUZZ_DEVICE,
    FUZZ_DRIVER,
    INDIRECT,
    INLINE_TABLE,
    MAX_CHAINS,
    MAX_NUM,
    MAX_RAW_DESCS,
    NEXT,
    PARTNER_CELL0,
    PARTNER_DESC,
    PARTNER_DEVICE,
    PARTNER_DRIVER,
    PARTNER_NUM,
    TABLE_CELL0,
    USED,
    QueuePlan,
    RingInput,
    Write,
    _put_packed,
    _put_split,
    _Raw,
    cell,
    honest_chain,
    iova,
)
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

__all__ = ["decode", "features_for"]

Seg = tuple[int, int, int]  # (iova, len, WRITE or 0)
_U16 = 0xFFFF


def features_for(device: str, *, packed: bool, event_idx: bool, indirect: bool, mrg_rxbuf: bool) -> int:
    bits = {VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM}
    if packed:
        bits.add(VIRTIO_F_RING_PACKED)
    if event_idx:
        bits.add(VIRTIO_RING_F_EVENT_IDX)
    if indirect:
        bits.add(VIRTIO_RING_F_INDIRECT_DESC)
    if device == "sim-net":
        bits |= {N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_MAC_ADDR}
        if mrg_rxbuf:
            bits.add(N.VIRTIO_NET_F_MRG_RXBUF)
    return sum(1 << bit for bit in bits)


class _Builder:
    """Lays the chains of one queue into its ring: split descriptors by index, packed ones by slot."""

    def __init__(self, q: QueuePlan, indirect: bool) -> None:
        self.q = q
        self.indirect = indirect
        self.cursor = 0  # split: next descriptor index; packed: slots used after start
        self.heads: list[list[int]] = []  # split: head indexes per stage chain list, flattened later

    def wrap_of(self, k: int) -> int:
        q = self.q
        return q.wrap ^ ((q.start + k) // q.num & 1)

    def honest(self, reader: ByteReader, base: int, chain_id: int, out: list[Write]) -> int | None:
        segs, contents = honest_chain(reader, self.q.kind, base)
        self.q.setup.extend(contents)
        self.q.honest += 1
        if reader.flag() and self.indirect:  # through an indirect table at the end of the cell
            table = base + INLINE_TABLE
            for i, (addr, length, flags) in enumerate(segs):
                more = i + 1 < len(segs)
                if self.q.packed:
                    self.q.setup.append(_put_packed(table, i, addr, length, 0, flags))
                else:
                    self.q.setup.append(_put_split(self.q, i, addr, length, flags | (NEXT if more else 0),
                                                   i + 1 if more else 0, table=table))
            segs = [(iova(table), 16 * len(segs), INDIRECT)]
            self.q.indirect_chains += 1
        return self._place(segs, chain_id, out)

    def _place(self, segs: list[Seg], chain_id: int, out: list[Write]) -> int | None:
        q = self.q
        if q.packed:
            if self.cursor + len(segs) > q.num:
                return None
            for i, (addr, length, flags) in enumerate(segs):
                more = NEXT if i + 1 < len(segs) else 0
                slot = (q.start + self.cursor) % q.num
                avail = AVAIL if self.wrap_of(self.cursor) else USED
                out.append(_put_packed(q.desc, slot, addr, length, chain_id, flags | more | avail))
                self.cursor += 1
            return chain_id
        indexes = [(self.cursor + i) % q.num for i in range(len(segs))]
        self.cursor += len(segs)
        for i, (addr, length, flags) in enumerate(segs):
            more = i + 1 < len(segs)
            q.setup.append(_put_split(q, indexes[i], addr, length, flags | (NEXT if more else 0),
                                      indexes[i + 1] if more else 0))
        return indexes[0]

    def raw(self, raw: _Raw, chain_id: int, out: list[Write]) -> int | None:
        q, r = self.q, raw.r
        count = r.between(1, MAX_RAW_DESCS)
        if q.packed:
            if self.cursor + count > q.num:
                return None
            buffer_id = r.pick((chain_id, chain_id, chain_id, r.u16()))
            for _ in range(count):
                slot = (q.start + self.cursor) % q.num
                flags = raw.packed_flags(self.wrap_of(self.cursor))
                out.append(_put_packed(q.desc, slot, raw.addr(), raw.length(), buffer_id, flags))
                if flags & INDIRECT and self.indirect:
                    q.indirect_chains += 1
                self.cursor += 1
            return buffer_id
        head = self.cursor % q.num
        for i in range(count):
            index = (self.cursor + i) % q.num
            addr, length, flags = raw.addr(), raw.length(), raw.split_flags()
            choice = r.u8()
            natural = (self.cursor + i + 1) % q.num
            nxt = natural if choice < 192 else r.pick((head, index, q.num, r.u16()))
            q.setup.append(_put_split(q, index, addr, length, flags, nxt))
            if flags & INDIRECT and self.indirect:
                q.indirect_chains += 1
        self.cursor += count
        return head


def _tables(r: ByteReader, packed: bool, q: QueuePlan) -> list[tuple[int, int]]:
    tables = [(cell(TABLE_CELL0 + t), r.between(1, 8)) for t in range(r.below(3))]
    raw = _Raw(r, tables)
    for base, entries in tables:
        for i in range(entries):
            addr, length = raw.addr(), raw.length()
            if packed:
                q.setup.append(_put_packed(base, i, addr, length, 0, raw.r.u8() & 7))
            else:
                flags = raw.split_flags()
                nxt = i + 1 if r.u8() < 200 else r.pick((0, i, entries, r.u16()))
                q.setup.append(_put_split(q, i, addr, length, flags, nxt, table=base))
    return tables


def _queue(r: ByteReader, kind: str, index: int, packed: bool) -> QueuePlan:
    if packed:
        num = 1 << r.below(9) if r.flag() else r.between(1, MAX_NUM)
        start, wrap = (0, 1) if r.flag() else (r.below(num), r.u8() & 1)
    else:
        num = 1 << r.below(9)
        start = r.pick((0, 0, _U16 - r.below(3), r.u16()))
        wrap = 1
    return QueuePlan(index, kind, num, FUZZ_DESC, FUZZ_DRIVER, FUZZ_DEVICE, start, wrap, packed=packed)


def _split_avail(r: ByteReader, q: QueuePlan, staged: list[list[int]], tags: set[str]) -> None:
    """Avail flags, used_event, the used ring's starting idx, then the entries and idx per stage."""
    flags = r.pick((0, 0, 1, _U16))
    q.setup.append((q.driver, flags.to_bytes(2, "little") + q.start.to_bytes(2, "little")))  # nothing published
    q.setup.append((q.driver + 4 + 2 * q.num, r.u16().to_bytes(2, "little")))  # used_event
    q.setup.append((q.device, bytes(2) + q.start.to_bytes(2, "little")))  # used flags, idx
    flat = [head for stage in staged for head in stage]
    if flat and r.u8() >= 224:  # an entry names some other descriptor (or none)
        flat[r.below(len(flat))] = r.pick((r.below(q.num), q.num, r.u16()))
        tags.add("avail_entry_fuzzed")
    at = 0
    for stage in staged:
        writes: list[Write] = []
        for _ in stage:
            slot = (q.start + at) % q.num
            writes.append((q.driver + 4 + 2 * slot, flat[at].to_bytes(2, "little")))
            at += 1
        q.avail_idx = (q.start + at) & _U16
        q.published.append(q.avail_idx)
        writes.append((q.driver + 2, q.avail_idx.to_bytes(2, "little")))
        q.stages.append(writes)
    if r.u8() >= 240:  # an idx that is not start + entries: ahead past the ring, or behind
        q.avail_idx = r.u16()
        q.published[-1] = q.avail_idx  # the device sees only the last idx a stage writes
        q.stages[-1].append((q.driver + 2, q.avail_idx.to_bytes(2, "little")))
        tags.add("avail_idx_fuzzed")


def _chains(r: ByteReader, q: QueuePlan, indirect: bool, tags: set[str]) -> None:
    """The fuzzed queue's chains, tables and stray descriptors, in one or two publish stages."""
    tables = _tables(r, q.packed, q)
    if tables:
        tags.add("indirect_table")
    raw = _Raw(r, tables)
    builder = _Builder(q, indirect)
    count = r.below(MAX_CHAINS + 1)
    cut = r.below(count + 1)
    staged: list[list[int]] = [[], []]
    packed_writes: list[list[Write]] = [[], []]
    for c in range(count):
        stage = 0 if c < cut else 1
        if r.u8() < 160:
            head = builder.honest(r, cell(c % FUZZ_CELLS), c, packed_writes[stage])
            tags.add("honest")
        else:
            head = builder.raw(raw, c, packed_writes[stage])
            tags.add("raw")
        if head is not None:
            staged[stage].append(head)
    stray: list[Write] = []
    for _ in range(r.below(3)):
        at = r.below(q.num)
        if q.packed:
            wrap = q.wrap if at >= q.start else 1 - q.wrap
            stray.append(_put_packed(q.desc, at, raw.addr(), raw.length(), r.u16(), raw.packed_flags(wrap)))
        else:
            q.setup.append(_put_split(q, at, raw.addr(), raw.length(), raw.split_flags(), r.u16() % (q.num + 2)))
        tags.add("stray")
    if q.packed:
        q.setup.append((q.driver, r.u16().to_bytes(2, "little") + r.pick((0, 0, 1, 2)).to_bytes(2, "little")))
        # Strays go with the first stage: written later they could land on a slot the device has
        # already filled with a used descriptor, and the driver would be erasing the evidence.
        q.stages = [w for w in packed_writes if w] or [[]]
        q.stages[0].extend(stray)
        return
    _split_avail(r, q, [s for s in staged if s] or [[]], tags)


def _partner(r: ByteReader, kind: str, q: QueuePlan) -> QueuePlan | None:
    """The honest other half of a net data pair (a TX frame goes nowhere without an RX buffer)."""
    if kind not in ("rx", "tx"):
        return None
    other = QueuePlan(1 if kind == "rx" else 0, "tx" if kind == "rx" else "rx", PARTNER_NUM, PARTNER_DESC,
                      PARTNER_DRIVER, PARTNER_DEVICE, 0, 1, packed=q.packed)
    builder = _Builder(other, indirect=False)
    writes: list[Write] = []
    heads = []
    for c in range(r.below(4)):
        head = builder.honest(r, cell(PARTNER_CELL0 + c), c, writes)
        if head is not None:
            heads.append(head)
    if other.packed:
        other.stages = [writes]
    else:
        other.setup.append((other.device, bytes(4)))
        other.stages = [[(other.driver + 4 + 2 * i, h.to_bytes(2, "little")) for i, h in enumerate(heads)]
                        + [(other.driver + 2, len(heads).to_bytes(2, "little"))]]
        other.avail_idx = len(heads)
        other.published = [len(heads)]
    return other


def decode(data: bytes) -> RingInput:
    """One input; never raises (see the module docstring)."""
    r = ByteReader(data)
    device = r.pick(("sim-net", "sim-blk"))
    kind = "blk" if device == "sim-blk" else r.pick(("rx", "tx", "ctrl"))
    packed, event_idx, indirect, mrg = r.flag(), r.flag(), r.flag(), r.flag()
    mrg = mrg and device == "sim-net"
    tags = {f"device:{device}", f"queue:{kind}", "format:packed" if packed else "format:split"}
    if event_idx:
        tags.add("event_idx")
    q = _queue(r, kind, {"blk": 0, "rx": 0, "tx": 1, "ctrl": 2}[kind], packed)
    _chains(r, q, indirect, tags)
    queues = [q]
    partner = _partner(r, kind, q)
    if partner is not None:
        queues.append(partner)
        tags.add("partner")
    patches = [(BUF_AREA + r.below(BUF_SIZE), r.take(r.below(17))) for _ in range(r.below(3))]
    if q.indirect_chains and indirect:
        tags.add("indirect_chain")
    if len(q.stages) > 1:
        tags.add("staged")
    features = features_for(device, packed=packed, event_idx=event_idx, indirect=indirect, mrg_rxbuf=mrg)
    early = r.below(4) == 0
    return RingInput(device, packed, event_idx, indirect, mrg, features, queues, patches, early, r.flag(), tags)
