"""Every limit of the reference devices, tested at it, just under it and just over it (issue 7, "Limits").

Each case drives the reference implementation through the interface a user has (the vhost-vdpa
front, or the compiled virtqueue for ring contents) and, where the model states the rule, asks
the model for the same answer: the two must agree. docs/limits.md is the table these tests prove.

- IOTLB entries: 2048 per address space (vdpa_sim's ``max_iotlb_entries`` default); the 2049th
  UPDATE fails with ENOSPC from the device, which ``write()`` reports as EFAULT, and nothing changes.
- Queue size: vhost's SET_VRING_NUM takes a non-zero power of two up to 0x8000 (not above 0xffff);
  the device takes up to GET_VRING_NUM and refuses a bigger size when the queue comes up.
- Config space: GET/SET_CONFIG with ``off + len`` up to the config size; len 0, one byte past and
  u32 wrap-around are EINVAL.
- Guest memory: a mapping or a ring or a buffer may end on the last byte of a region; one byte more
  is refused (the mapping) or breaks the queue with an ACCESS_FAIL and no write (the ring, the buffer).
- Chains: a chain may hold as many descriptors as the queue has; an indirect table as many entries;
  one more is bad input. sim-blk's seg_max (queue size - 2) is the most data segments that fit.
- Net frames: a frame of mtu + 14 bytes passes, one byte more is dropped; a frame filling its RX
  buffer exactly passes, one byte more is dropped (no MRG_RXBUF).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from vdpacert.impl.guestmem import MemoryRegistry
from vdpacert.impl.iotlb import ACCESS_RW, Iotlb
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import DEFAULT_MAX_IOTLB_ENTRIES, VIRTQUEUE_MAX_SIZE
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.impl.virtqueue import BAD_CHAIN_TOO_LONG, BAD_LOOP, BAD_UNMAPPED, VirtQueue, VirtQueueError
from vdpacert.model.chains import (
    BadInput,
    Chain,
    ChainFault,
    Layout,
    PackedIndirectTable,
    SplitTable,
    WalkContext,
    walk_chain,
)
from vdpacert.model.guest_memory import ModelMemory, RangeTranslator
from vdpacert.model.iotlb import IotlbModel
from vdpacert.model.spec import ModelErrno
from vdpacert.model.vdpa_device import VdpaDeviceSpec
from vdpacert.model.vhost_vdpa import IotlbMessageError, VhostVdpaModel
from vdpacert.uapi import vhost as V  # noqa: N812
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET

try:
    from .ring_driver import INDIRECT, NEXT, WRITE, Guest, PackedDriver, SplitDriver, device_queue, features
    from .test_sim_blk import Rig, ring_features, sectors
    from .test_sim_net import HDR_LEN, NetRig, frame_seq, make_frame, net_features
except ImportError:
    from ring_driver import INDIRECT, NEXT, WRITE, Guest, PackedDriver, SplitDriver, device_queue, features
    from test_sim_blk import Rig, ring_features, sectors
    from test_sim_net import HDR_LEN, NetRig, frame_seq, make_frame, net_features

LIMIT = DEFAULT_MAX_IOTLB_ENTRIES
MiB = 1 << 20


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(MiB)
    yield g
    g.close()


def opened(guest: Guest, dev: SimBlk | SimNet) -> VhostVdpa:
    front = VhostVdpa(dev, guest.registry)
    front.set_owner()
    front.set_backend_features((1 << T.VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << T.VHOST_BACKEND_F_IOTLB_ASID))
    return front


def model_of(front: VhostVdpa, *, limit: int | None = LIMIT, quirks: tuple[str, ...] = ()) -> VhostVdpaModel:
    """The model of the device behind ``front`` (its GET_* answers), opened and owned the same way."""
    dev = front.parent
    spec = VdpaDeviceSpec(device_id=front.get_device_id(), device_features=front.get_features(), nvqs=dev.nvqs,
                          vq_num_max=front.get_vring_num(), config=front.get_config(0, front.get_config_size()),
                          ngroups=dev.ngroups, nas=dev.nas, map_op="dma_map", iotlb_limit=limit)
    model = VhostVdpaModel(spec, quirks=quirks)
    model.open()
    model.VHOST_SET_OWNER()
    model.VHOST_SET_BACKEND_FEATURES(front.acked_backend_features)
    return model


def impl_errno(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as error:
        return error.errno
    return 0


def model_errno(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except ModelErrno as error:
        return error.errno
    return 0


# ----- IOTLB entries per address space ------------------------------------------------------------------


@pytest.mark.parametrize("count", [3, 4, 5], ids=["under", "at", "over"])
def test_iotlb_object_limit_agrees_with_the_model(count: int) -> None:
    """The compiled Iotlb and IotlbModel with the same cap: ``count`` one-byte maps, limit 4."""
    impl, model = Iotlb(4), IotlbModel(limit=4)
    answers = [(impl_errno(impl.update, 2 * i, 1, 0x1000 + i, ACCESS_RW),
                model_errno(model.update, 2 * i, 1, 0x1000 + i, ACCESS_RW)) for i in range(count)]
    assert answers == [(0, 0)] * min(count, 4) + [(errno.ENOSPC, errno.ENOSPC)] * (count - 4)
    assert len(impl) == len(model) == min(count, 4)
    assert [(s, e) for s, e, _, _ in impl.entries()] == [(m.start, m.last) for m in model.maps]


def fill(front: VhostVdpa, guest: Guest, count: int, *, asid: int = 0) -> None:
    """``count`` one-byte mappings (every other IOVA, so none merge or overlap)."""
    for i in range(count):
        front.iotlb_update(0x10_0000 + 2 * i, 1, guest.mem.uaddr + i, asid=asid)


@pytest.mark.parametrize("kind", ["blk", "net"])
def test_iotlb_entry_limit_through_the_front(guest: Guest, kind: str) -> None:
    """LIMIT - 1 and LIMIT updates succeed; the next is EFAULT (cause ENOSPC), as the model says, and
    changes nothing; invalidating one entry makes room again. Each address space has its own cap."""
    dev = SimBlk("lim-blk", capacity=8) if kind == "blk" else SimNet("lim-net")
    assert dev.max_iotlb_entries == LIMIT
    front = opened(guest, dev)
    model = model_of(front)
    try:
        fill(front, guest, LIMIT - 1)
        assert len(front.address_spaces()[0]) == LIMIT - 1  # under
        fill_model = [model.write_msg(T.VHOST_IOTLB_UPDATE, 0, 0x10_0000 + 2 * i, 1, 0x1000 + i, 3)
                      for i in range(LIMIT)]
        assert len(fill_model) == LIMIT
        front.iotlb_update(0x10_0000 + 2 * (LIMIT - 1), 1, guest.mem.uaddr + LIMIT - 1)  # at
        before = (front.address_spaces(), dev.address_space(0).entries())
        with pytest.raises(OSError) as over:
            front.iotlb_update(0x80_0000, 1, guest.mem.uaddr)
        assert over.value.errno == errno.EFAULT and isinstance(over.value.__cause__, OSError)
        assert over.value.__cause__.errno == errno.ENOSPC
        with pytest.raises(IotlbMessageError) as predicted:
            model.write_msg(T.VHOST_IOTLB_UPDATE, 0, 0x80_0000, 1, 0x1000, 3)
        assert predicted.value.errno == errno.EFAULT and predicted.value.cause.errno == errno.ENOSPC
        assert (front.address_spaces(), dev.address_space(0).entries()) == before
        front.iotlb_invalidate(0x10_0000, 1)
        front.iotlb_update(0x80_0000, 1, guest.mem.uaddr)
        assert len(dev.address_space(0)) == LIMIT
        if dev.nas > 1:  # the cap is per address space
            fill(front, guest, 1, asid=1)
            assert len(dev.address_space(1)) == 1
    finally:
        front.close()


# ----- queue size -----------------------------------------------------------------------------------


#: SET_VRING_NUM answers: vhost_vring_set_num takes a non-zero power of two <= 0xffff (so 0x8000 at most),
#: whatever the ring layout; the device maximum (256) is not checked there (quirk
#: vhost_vdpa.vring_num_bounds_unchecked) but when the queue comes up.
VRING_NUMS = [(0, errno.EINVAL), (1, 0), (2, 0), (3, errno.EINVAL), (255, errno.EINVAL), (256, 0),
              (257, errno.EINVAL), (512, 0), (32767, errno.EINVAL), (32768, 0), (32769, errno.EINVAL),
              (65535, errno.EINVAL), (65536, errno.EINVAL)]


@pytest.mark.parametrize(("num", "expected"), VRING_NUMS, ids=[str(n) for n, _ in VRING_NUMS])
def test_set_vring_num(guest: Guest, num: int, expected: int) -> None:
    front = opened(guest, SimBlk("num-blk", capacity=8))
    try:
        assert front.get_vring_num() == 256
        quirky = model_of(front, quirks=("vhost_vdpa.vring_num_bounds_unchecked",))
        plain = model_of(front)
        assert impl_errno(front.set_vring_num, 0, num) == expected
        assert model_errno(quirky.VHOST_SET_VRING_NUM, 0, num) == expected
        # The plain rule (a size the device cannot take is refused at once) is stricter above 256.
        assert model_errno(plain.VHOST_SET_VRING_NUM, 0, num) == (errno.EINVAL if num > 256 else expected)
    finally:
        front.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize(("num", "works"), [(128, True), (256, True), (512, False)], ids=["under", "at", "over"])
def test_device_maximum_queue_size_at_driver_ok(guest: Guest, packed: bool, num: int, works: bool) -> None:
    """GET_VRING_NUM (256) is the largest size a queue comes up with; 512 passes SET_VRING_NUM and is
    refused at DRIVER_OK with DEVICE_NEEDS_RESET."""
    rig = Rig(guest, SimBlk("max-blk", capacity=8), packed=packed, num=num)
    try:
        assert rig.needs_reset() is not works
        if works:
            status, length, _ = rig.request(B.VIRTIO_BLK_T_OUT, 1, out=sectors(1, 7))
            assert (status, length) == (B.VIRTIO_BLK_S_OK, 1)
            assert rig.dev.disk.read(1, 512) == sectors(1, 7)
    finally:
        rig.close()


@pytest.mark.parametrize(("num", "split_ok", "packed_ok"),
                         [(0, False, False), (1, True, True), (3, False, True), (VIRTQUEUE_MAX_SIZE, True, True),
                          (VIRTQUEUE_MAX_SIZE + 1, False, False)])
def test_virtqueue_sizes_per_layout(num: int, split_ok: bool, packed_ok: bool) -> None:
    """The compiled queue: split sizes are powers of two (§2.7), packed any size (§2.8), both in [1, 32768]."""
    for packed, ok in ((False, split_ok), (True, packed_ok)):
        vq = VirtQueue()
        vq.set_features(features(packed=packed))
        vq.set_address(0x1000, 0x100000, 0x200000)
        vq.set_iotlb(Iotlb())
        vq.set_memory(MemoryRegistry())
        try:
            vq.set_num(num)
            vq.set_ready(True)
        except OSError as error:
            assert not ok and error.errno == errno.EINVAL, (num, packed)
        else:
            assert ok, (num, packed)


# ----- config space ----------------------------------------------------------------------------------


def config_cases(size: int) -> list[tuple[str, int, int, int]]:
    return [("under", 0, size - 1, 0), ("at", 0, size, 0), ("at-last-byte", size - 1, 1, 0),
            ("over", 0, size + 1, errno.EINVAL), ("over-offset", size, 1, errno.EINVAL),
            ("len-0", 0, 0, errno.EINVAL), ("len-0-at-end", size, 0, errno.EINVAL),
            ("u32-wrap-len", 1, 0xFFFF_FFFF, errno.EINVAL), ("u32-wrap-off", 0xFFFF_FFFF, 2, errno.EINVAL)]


@pytest.mark.parametrize("kind", ["blk", "net"])
def test_config_bounds(guest: Guest, kind: str) -> None:
    front = opened(guest, SimBlk("cfg-blk", capacity=8) if kind == "blk" else SimNet("cfg-net"))
    try:
        size = front.get_config_size()
        assert size == (96 if kind == "blk" else 24)
        model = model_of(front)
        whole = front.get_config(0, size)
        for name, off, length, expected in config_cases(size):
            arg = T.VHOST_VDPA_CONFIG.pack(off, length) + bytes(min(length, size + 1))
            got = impl_errno(front.ioctl, V.VHOST_VDPA_GET_CONFIG, arg)
            assert got == expected == model_errno(model.VHOST_VDPA_GET_CONFIG, off, length), name
            if not expected:
                assert front.get_config(off, length) == whole[off:off + length] == model.VHOST_VDPA_GET_CONFIG(
                    off, length), name
            got = impl_errno(front.ioctl, V.VHOST_VDPA_SET_CONFIG, arg)
            assert got == expected, name
        assert front.get_config(0, size) == whole  # both devices' config is read-only to the driver
    finally:
        front.close()


# ----- guest memory bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "expected"), [(-1, 0), (0, 0), (1, errno.EFAULT)],
                         ids=["under", "at", "over"])
def test_iotlb_update_user_range_at_the_end_of_memory(guest: Guest, extra: int, expected: int) -> None:
    """An UPDATE whose user range ends on the last byte of the registered region, or one byte past."""
    front = opened(guest, SimBlk("mem-blk", capacity=8))
    model = model_of(front)
    model.set_user_memory([(guest.mem.uaddr, guest.size)])
    try:
        size = guest.size + extra
        got = impl_errno(front.iotlb_update, 0x1000, size, guest.mem.uaddr)
        predicted = model_errno(model.write_msg, T.VHOST_IOTLB_UPDATE, 0, 0x1000, size, guest.mem.uaddr, 3)
        assert got == predicted == expected
        assert len(front.address_spaces().get(0, [])) == (0 if expected else 1)
    finally:
        front.close()


def model_walk(guest: Guest, table_iova: int, head: int, num: int, *, packed: bool = False,
               indirect_entries: int = 0) -> Chain | ChainFault:
    """The model's verdict on a chain, over a copy of the guest's bytes mapped exactly as the Iotlb maps them.

    Split: the chain at ``head`` of the descriptor table at ``table_iova``. Packed: the indirect table of
    ``indirect_entries`` entries at ``table_iova`` (the model's walk of what the ring's one descriptor names).
    """
    memory = ModelMemory()
    memory.write(guest.iova_base, guest.snapshot())
    translator = RangeTranslator()
    translator.map(guest.iova_base, guest.size)
    ctx = WalkContext(Layout.PACKED if packed else Layout.SPLIT, num, features(packed=packed, indirect=True),
                      memory, translator)
    if packed:
        return walk_chain(PackedIndirectTable(memory, translator, table_iova, indirect_entries), 0, ctx)
    return walk_chain(SplitTable(memory, translator, table_iova, num), head, ctx)


@pytest.mark.parametrize(("shift", "ok"), [(-16, True), (0, True), (1, False)], ids=["under", "at", "over"])
def test_descriptor_buffer_ending_at_the_end_of_memory(guest: Guest, shift: int, ok: bool) -> None:
    """A 512-byte device-writable buffer ending ``shift`` bytes from the end of guest memory."""
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    start = guest.size - 512 + shift
    driver.write_desc(0, guest.iova(start), 512, WRITE)
    driver.publish(0)
    before = guest.snapshot()
    verdict = model_walk(guest, guest.iova(driver.desc), 0, 4)
    if ok:
        chain = vq.pop_chain()
        assert chain is not None and chain.writable_len == 512
        vq.write_chain(chain, 0, b"\x5a" * 512)
        vq.push_chain(chain, 512)
        assert guest.mem.read(start, 512) == b"\x5a" * 512
        assert not isinstance(verdict, ChainFault)
    else:
        with pytest.raises(VirtQueueError) as broke:
            vq.pop_chain()
        assert broke.value.code == BAD_UNMAPPED and broke.value.fault == (guest.iova(guest.size), 2)
        assert guest.snapshot() == before  # nothing written
        assert isinstance(verdict, ChainFault) and verdict.bad is BadInput.ADDRESS_UNMAPPED
        # The model names the access that failed (its start); the impl the first byte past the end.
        assert verdict.access is not None and verdict.access.iova == guest.iova(start)


@pytest.mark.parametrize("over", [False, True], ids=["at", "over"])
def test_ring_in_the_last_bytes_of_memory(guest: Guest, over: bool) -> None:
    """The descriptor table of a 4-entry split ring placed in the last 64 bytes of memory (every entry
    usable), or 16 bytes later (its last entry is past the end: using it breaks the queue, nothing written)."""
    driver = SplitDriver(guest, 4)
    driver.desc = guest.size - 64 + (16 if over else 0)
    vq = device_queue(guest, driver, features())
    buf = guest.alloc(64, 16)
    for index in range(3):
        driver.write_desc(index, guest.iova(buf), 8, WRITE)
    driver.publish(0, 1, 2)
    for _ in range(3):
        chain = vq.pop_chain()
        assert chain is not None
        vq.push_chain(chain, 0)
    if over:
        driver.publish(3)  # descriptor 3 would be the 16 bytes past the end
        before = guest.snapshot()
        with pytest.raises(VirtQueueError) as broke:
            vq.pop_chain()
        assert broke.value.code == BAD_UNMAPPED and broke.value.fault == (guest.iova(guest.size), 1)
        assert guest.snapshot() == before
    else:
        driver.write_desc(3, guest.iova(buf), 8, WRITE)
        driver.publish(3)
        chain = vq.pop_chain()
        assert chain is not None and chain.head == 3
        vq.push_chain(chain, 0)
        assert driver.used_idx() == 4


def test_mapped_iova_past_the_registered_region_is_unmapped(guest: Guest) -> None:
    """An IOTLB entry may point past guest memory (the compiled Iotlb does not check); the registry then
    refuses the access: a buffer ending on the region's last byte works, one byte past faults."""
    guest.iotlb.update(guest.iova(guest.size), 4096, guest.mem.uaddr + guest.size, ACCESS_RW)
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    driver.write_desc(0, guest.iova(guest.size - 8), 8, WRITE)
    driver.write_desc(1, guest.iova(guest.size - 8), 9, WRITE)
    driver.publish(0, 1)
    chain = vq.pop_chain()
    assert chain is not None
    vq.push_chain(chain, 0)
    with pytest.raises(VirtQueueError) as broke:
        vq.pop_chain()
    assert broke.value.code == BAD_UNMAPPED


# ----- the largest chains ------------------------------------------------------------------------------


NUM = 8


@pytest.mark.parametrize(("length", "loops"), [(NUM - 1, False), (NUM, False), (NUM + 1, True)],
                         ids=["under", "at", "over"])
def test_split_chain_of_queue_size_descriptors(guest: Guest, length: int, loops: bool) -> None:
    """A split chain of NUM descriptors is the longest; NUM + 1 can only revisit one (a loop)."""
    driver = SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features())
    buf = guest.alloc(16 * NUM, 16)
    for i in range(min(length, NUM)):
        last = i == length - 1
        nxt = 0 if loops and i == NUM - 1 else i + 1
        driver.write_desc(i, guest.iova(buf + 16 * i), 16, WRITE | (0 if last and not loops else NEXT),
                          0 if last and not loops else nxt)
    driver.publish(0)
    verdict = model_walk(guest, guest.iova(driver.desc), 0, NUM)
    if loops:
        with pytest.raises(VirtQueueError) as broke:
            vq.pop_chain()
        assert broke.value.code == BAD_LOOP
        assert isinstance(verdict, ChainFault) and verdict.bad is BadInput.DESCRIPTOR_LOOP
    else:
        chain = vq.pop_chain()
        assert chain is not None and chain.ndesc == length and chain.writable_len == 16 * length
        assert not isinstance(verdict, ChainFault) and verdict.writable_len == 16 * length


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize(("entries", "ok"), [(NUM - 1, True), (NUM, True), (NUM + 1, False)],
                         ids=["under", "at", "over"])
def test_indirect_table_of_queue_size_entries(guest: Guest, packed: bool, entries: int, ok: bool) -> None:
    """An indirect table may hold as many descriptors as the queue (a chain is at most the queue size,
    §2.7.5.3.1 / §2.8.17); one more is CHAIN_TOO_LONG for the impl and the model alike. (Linux's vhost
    allows 65536 entries, E2BIG above: the reference device is stricter, as the spec permits.)"""
    driver: SplitDriver | PackedDriver = PackedDriver(guest, NUM) if packed else SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features(packed=packed, indirect=True))
    table = guest.alloc(16 * entries, 16)
    buf = guest.alloc(16 * entries, 16)
    for i in range(entries):
        more = NEXT if i + 1 < entries else 0
        tail = (0, WRITE) if packed else (WRITE | more, i + 1 if more else 0)  # packed: {id, flags}, in order
        guest.mem.write(table + 16 * i, struct.pack("<QIHH", guest.iova(buf + 16 * i), 16, *tail))
    if isinstance(driver, PackedDriver):
        driver.write_desc(0, guest.iova(table), 16 * entries, 0, INDIRECT | driver.avail_flags(1))
        verdict = model_walk(guest, guest.iova(table), 0, NUM, packed=True, indirect_entries=entries)
    else:
        driver.write_desc(0, guest.iova(table), 16 * entries, INDIRECT)
        driver.publish(0)
        verdict = model_walk(guest, guest.iova(driver.desc), 0, NUM)
    before = guest.snapshot()
    if ok:
        chain = vq.pop_chain()
        assert chain is not None and chain.writable_len == 16 * entries
        assert not isinstance(verdict, ChainFault) and verdict.writable_len == 16 * entries
    else:
        with pytest.raises(VirtQueueError) as broke:
            vq.pop_chain()
        assert broke.value.code == BAD_CHAIN_TOO_LONG
        assert guest.snapshot() == before
        assert isinstance(verdict, ChainFault) and verdict.bad is BadInput.CHAIN_TOO_LONG


@pytest.mark.parametrize(("length", "ok"), [(NUM, True), (NUM + 1, False)], ids=["at", "over"])
def test_packed_chain_of_queue_size_slots(guest: Guest, length: int, ok: bool) -> None:
    """A packed chain may use every slot of the ring; a chain still asking for more after NUM slots
    (its last NEXT wraps onto its own head) is CHAIN_TOO_LONG."""
    driver = PackedDriver(guest, NUM)
    vq = device_queue(guest, driver, features(packed=True))
    buf = guest.alloc(16 * NUM, 16)
    for i in range(NUM):
        more = NEXT if i + 1 < length else 0
        flags = WRITE | more | driver.avail_flags(1)
        driver.write_desc(i, guest.iova(buf + 16 * i), 16, 0, flags)
    if ok:
        chain = vq.pop_chain()
        assert chain is not None and chain.ndesc == NUM
    else:
        with pytest.raises(VirtQueueError) as broke:
            vq.pop_chain()
        assert broke.value.code == BAD_CHAIN_TOO_LONG


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize(("extra", "ok"), [(-1, True), (0, True), (1, False)], ids=["under", "at", "over"])
def test_blk_request_with_seg_max_segments(guest: Guest, packed: bool, extra: int, ok: bool) -> None:
    """sim-blk advertises seg_max = queue size - 2 (header and status take the other two descriptors).
    A write of seg_max one-sector segments (an indirect table of exactly the queue size) is served; one
    segment more is a chain longer than the queue: NEEDS_RESET and no disk or guest byte written."""
    dev = SimBlk("seg-blk", capacity=512)
    seg_max = struct.unpack_from("<I", dev.config_space, B.VIRTIO_BLK_CONFIG_SEG_MAX)[0]
    assert seg_max == dev.queue_size - 2 == 254
    rig = Rig(guest, dev, packed=packed, num=dev.queue_size, features=ring_features(packed, indirect=True))
    try:
        count = seg_max + extra
        data = [sectors(1, 100 + i) for i in range(count)]
        head = rig.drivers[0].add([struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0), *data], [1], indirect=True)
        before = guest.snapshot()
        rig.front.kick(0)
        used = dict(rig.drivers[0].get_used())
        if ok:
            assert used == {head: 1} and rig.drivers[0].written(head) == bytes([B.VIRTIO_BLK_S_OK])
            assert rig.dev.disk.read(0, 512 * count) == b"".join(data)
        else:
            assert used == {} and rig.needs_reset()
            assert guest.snapshot() == before and rig.dev.disk.read(0, 512 * count) == bytes(512 * count)
    finally:
        rig.close()


# ----- net frames ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "delivered"), [(-1, True), (0, True), (1, False)], ids=["under", "at", "over"])
def test_frame_of_mtu_plus_header(guest: Guest, extra: int, delivered: bool) -> None:
    """A frame of mtu + 14 bytes (MTU 1500) comes back; one byte more is dropped (drop_mtu), the queue runs on."""
    rig = NetRig(guest, SimNet("mtu-net"), features=net_features(ctrl=False))
    try:
        length = rig.dev.mtu + 14 + extra
        rig.post_rx(2, size=HDR_LEN + 4096)
        rig.send([make_frame(1, length), make_frame(2, 64)])
        got = [(frame_seq(frame), len(frame)) for _, frame in rig.receive()]
        assert got == ([(1, length)] if delivered else []) + [(2, 64)]
        assert rig.dev.loopback_stats()["drop_mtu"] == (0 if delivered else 1)
        assert len(rig.tx_used()) == 2  # both TX chains returned, the dropped one included
    finally:
        rig.close()


@pytest.mark.parametrize(("extra", "delivered"), [(-1, True), (0, True), (1, False)], ids=["under", "at", "over"])
def test_frame_filling_its_rx_buffer(guest: Guest, extra: int, delivered: bool) -> None:
    """Without MRG_RXBUF a frame must fit one RX buffer: header + frame == buffer size passes, one byte
    more is dropped (drop_rx_small) and the buffer stays available for the next frame."""
    rig = NetRig(guest, SimNet("rx-net"), features=net_features(ctrl=False))
    try:
        size = HDR_LEN + 1000
        rig.post_rx(1, size=size)
        rig.send([make_frame(1, 1000 + extra)])
        got = [(frame_seq(frame), len(frame)) for _, frame in rig.receive()]
        assert got == ([(1, 1000 + extra)] if delivered else [])
        assert rig.dev.loopback_stats()["drop_rx_small"] == (0 if delivered else 1)
        if not delivered:
            rig.send([make_frame(2, 1000)])
            assert [frame_seq(frame) for _, frame in rig.receive()] == [2]
        assert not rig.front.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    finally:
        rig.close()
