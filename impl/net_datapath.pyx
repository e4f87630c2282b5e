# cython: language_level=3
"""sim-net's datapath: transmitq N loops back to receiveq N (virtio v1.3 §5.1.6).

Each TX chain is ``virtio_net_hdr_v1`` (12 bytes: VERSION_1 is required, so ``num_buffers`` is
always present) followed by one Ethernet frame. The frame reappears on the paired RX queue, in
transmit order, behind a receive header the device derives from the transmit one. Bytes go
straight from the TX chain's segments into the RX chains (``copy_to_chain``, which logs dirty
pages); nothing is staged in a Python object or a bounce buffer.

Choices, from the spec (section numbers of virtio v1.3):

- **No RX buffer, nothing lost.** When the RX queue has no (or, with MRG_RXBUF, not enough)
  buffers, the TX chain is unpopped and so are the RX chains taken for it: the frame stays in
  the TX ring and is delivered when the driver posts RX buffers and kicks (``rx_starved``).
- **num_buffers** is 1 without MRG_RXBUF (§5.1.6.3.1: one descriptor chain per packet) and the
  number of RX buffers the header and frame were spread over with it; every buffer but the last
  is filled to its full length (§5.1.6.4.1).
- **Frame larger than the RX buffer without MRG_RXBUF**: the device may only use a single buffer
  (§5.1.6.3.1) and the driver SHOULD have posted buffers large enough (§5.1.6.3: 1526 bytes, or
  65562 with guest GSO, or the MTU); a frame that does not fit is *dropped* (``drop_rx_small``),
  its TX chain is returned and the RX buffer is left available for the next frame, as QEMU does
  (truncating would deliver a corrupt packet; stalling would block the queue for good).
  With MRG_RXBUF the same drop happens only when the frame's buffers already fill the whole RX
  ring and are still too small (the driver could never post more).
- **Checksum** (§5.1.6.4.1): with GUEST_CSUM a NEEDS_CSUM frame keeps NEEDS_CSUM, csum_start and
  csum_offset (the partial checksum the sender wrote is what the receiver expects). Without
  GUEST_CSUM the device MUST set flags to 0 and SHOULD supply a fully checksummed packet: it
  completes the checksum (ones' complement of the sum from csum_start to the end, 0 sent as
  0xFFFF as Linux's skb_checksum_help does). DATA_VALID is never set: the device validates
  nothing. A transmit DATA_VALID or RSC_INFO bit is ignored (§5.1.6.2.2: the driver must not set them).
- **GSO**: a GSO frame is passed through (gso_type, gso_size, NEEDS_CSUM and csum fields) only
  when the receiver negotiated the matching GUEST_TSO4/TSO6/UFO/USO4/USO6 (and GUEST_ECN for the
  ECN bit) and GUEST_CSUM; otherwise it is dropped (``drop_gso``): the device does not segment
  in software. hdr_len is recomputed as csum_start + transport header length (§5.1.6.4.1: not
  less than the headers), since the sender's value is only a hint (§5.1.6.2.2). A GSO frame without
  NEEDS_CSUM or with gso_size 0 is malformed. Non-GSO frames get gso_type NONE, hdr_len and
  gso_size 0.
- **MTU**: a non-GSO frame longer than mtu + 14 is dropped (``drop_mtu``); GSO frames are bounded
  by a 64 KiB IP datagram (NET_MAX_GSO_FRAME).
- **Malformed** TX chains (shorter than header + Ethernet header, csum_start + csum_offset + 2
  past the frame, unknown gso_type) are dropped and counted; they are the driver's error but
  not a ring violation, so the queue keeps running. Ring violations (negative VqStatus from
  the VirtQueue) stop the call: the completed frames are still pushed, the error is returned
  with the queue it came from, and the device sets DEVICE_NEEDS_RESET.
- Transmit offloads are honoured whatever the driver negotiated on the transmit side (CSUM,
  HOST_TSO*): doing the checksum the driver asked for is harmless.

The call holds the GIL (``run``) although the C function is nogil: config ops run under the
GIL, so the datapath cannot race a ``set_num`` that frees a queue's segment arena. A device that
serialises its config ops against the datapath may call ``net_loopback`` without it.
"""

import errno

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

from vdpacert.impl.virtqueue cimport (
    POP_CHAIN,
    POP_EMPTY,
    POP_NO_SPACE,
    VQ_BAD_DENIED,
    VQ_ERR_CHAIN,
    VQ_BAD_UNMAPPED,
    Chain,
    VirtQueue,
    VqSegment,
)

from vdpacert.impl.virtqueue import VirtQueueError
from vdpacert.uapi.virtio_net import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_MRG_RXBUF,
)

# virtio_net_hdr values (§5.1.6), as C constants for the hot loop.
cdef enum:
    HDR_F_NEEDS_CSUM = 1
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_UDP = 3
    GSO_TCPV6 = 4
    GSO_UDP_L4 = 5
    GSO_ECN = 0x80
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    ETHERTYPE_VLAN = 0x8100
    ETHERTYPE_QINQ = 0x88A8
    MIN_MTU = 68
    MAX_MTU = 65535

# deliver_frame() results
cdef enum:
    FRAME_DONE = 0          # the TX chain is consumed (delivered or dropped), queued for push
    FRAME_RX_EMPTY = 1      # the TX chain was given back: wait for RX buffers

ERR_WORK = NET_ERR_WORK

GSO_OK_TCPV4 = NET_GSO_OK_TCPV4
GSO_OK_TCPV6 = NET_GSO_OK_TCPV6
GSO_OK_UDP = NET_GSO_OK_UDP
GSO_OK_USO4 = NET_GSO_OK_USO4
GSO_OK_USO6 = NET_GSO_OK_USO6
GSO_OK_ECN = NET_GSO_OK_ECN
HDR_LEN = NET_HDR_LEN
TX_BATCH = NET_TX_BATCH
MAX_GSO_FRAME = NET_MAX_GSO_FRAME

_STAT_NAMES = ("frames", "bytes", "drop_mtu", "drop_malformed", "drop_gso", "drop_rx_small", "tx_used", "rx_used")


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline uint64_t csum_add(uint64_t acc, const uint8_t *p, uint64_t n, uint64_t pos) noexcept nogil:
    # Internet checksum (RFC 1071) of n bytes whose first byte sits `pos` bytes after the start
    # of the summed range: even positions are the high byte of a 16-bit word.
    cdef uint64_t i = 0
    if n and pos & 1:
        acc += p[0]
        i = 1
    while i + 1 < n:
        acc += (<uint64_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        acc += <uint64_t>p[i] << 8
    return acc


cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    acc = ~acc & 0xFFFF
    return <uint16_t>(acc if acc else 0xFFFF)


cdef struct RxCursor:
    uint32_t i              # chain index (absolute, into work.rx)
    uint64_t off            # offset inside that chain's used length


cdef inline void rx_seek(const uint32_t *lens, uint32_t first, uint32_t end, uint64_t offset,
                         RxCursor *cur) noexcept nogil:
    cur.i = first
    while cur.i < end and offset >= lens[cur.i]:
        offset -= lens[cur.i]
        cur.i += 1
    cur.off = offset


cdef int64_t rx_write(VirtQueue rx, Chain *chains, const uint32_t *lens, uint32_t end, RxCursor *cur,
                      const uint8_t *src, uint64_t length) noexcept nogil:
    # Write `length` bytes at the cursor over the frame's RX chains (each takes lens[i] bytes)
    # and advance it. Bytes written, or a negative VqStatus.
    cdef uint64_t done = 0, take
    cdef int64_t rc
    while done < length and cur.i < end:
        if cur.off >= lens[cur.i]:
            cur.i += 1
            cur.off = 0
            continue
        take = lens[cur.i] - cur.off
        if take > length - done:
            take = length - done
        rc = rx.copy_to_chain(&chains[cur.i], cur.off, src + done, take)
        if rc < 0:
            return rc
        done += take
        cur.off += take
    return <int64_t>done


cdef inline uint32_t ring_slots(VirtQueue vq, const Chain *chain) noexcept nogil:
    # A lower bound of the ring slots a chain occupies: exact for packed rings and for split
    # rings without indirect descriptors (where ndesc also counts indirect-table entries).
    if vq.packed or not vq.indirect_desc:
        return chain.ndesc if chain.ndesc else 1
    return 1


cdef inline int consume(LoopbackWork *work, LoopbackStats *stats) noexcept nogil:
    # The TX chain at work.tx[n_tx] is done: return it with 0 bytes written (TX is read-only).
    work.tx_written[work.n_tx] = 0
    work.n_tx += 1
    stats.tx_used += 1
    return FRAME_DONE


cdef int flush(VirtQueue tx, VirtQueue rx, LoopbackWork *work, LoopbackStats *stats) noexcept nogil:
    # RX first: the receiver sees a frame no later than the sender gets its buffer back.
    cdef int rc
    if work.n_rx:
        rc = rx.push_batch(work.rx, work.rx_written, work.n_rx)
        if rc < 0:
            stats.failed_queue = 1
            return rc
        work.n_rx = 0
    if work.n_tx:
        rc = tx.push_batch(work.tx, work.tx_written, work.n_tx)
        if rc < 0:
            stats.failed_queue = 0
            return rc
        work.n_tx = 0
    return 0


cdef int give_back_rx(VirtQueue rx, LoopbackWork *work, uint32_t first, LoopbackStats *stats) noexcept nogil:
    # Unpop the frame's RX chains, newest first (unpop is LIFO).
    cdef int rc
    while work.n_rx > first:
        rc = rx.unpop(&work.rx[work.n_rx - 1])
        if rc < 0:
            stats.failed_queue = 1
            return rc
        work.n_rx -= 1
    return 0


cdef int transport_header_len(VirtQueue tx, Chain *tc, uint32_t gso, uint32_t csum_start,
                              uint64_t frame_len, uint32_t *thl) noexcept nogil:
    # UDP: 8 bytes. TCP: the data offset (high nibble of byte 12 of the TCP header), >= 20.
    cdef uint8_t byte = 0
    if gso == GSO_UDP or gso == GSO_UDP_L4:
        thl[0] = 8
        return 0
    if <uint64_t>csum_start + 13 > frame_len:
        return -1
    tx.copy_from_chain(tc, NET_HDR_LEN + <uint64_t>csum_start + 12, &byte, 1)
    thl[0] = (byte >> 4) * 4
    return 0 if thl[0] >= 20 else -1


cdef int deliver_frame(VirtQueue tx, VirtQueue rx, const NetLoopbackConfig *cfg, LoopbackWork *work,
                       LoopbackStats *stats) noexcept nogil:
    # The TX chain just popped is work.tx[work.n_tx]. Deliver its frame (or drop it): FRAME_DONE,
    # FRAME_RX_EMPTY (the chain was unpopped), or a negative VqStatus (stats.failed_queue set).
    cdef Chain *tc = &work.tx[work.n_tx]
    cdef Chain *c
    cdef VqSegment *seg
    cdef uint8_t hdr[NET_HDR_LEN]
    cdef uint8_t out[NET_HDR_LEN]
    cdef uint8_t raw[2]
    cdef uint8_t flags, gso_type, gso
    cdef uint16_t gso_size, csum_start, csum_offset, ethertype, csum
    cdef uint32_t need = 0, thl = 0, first, nb, slots, i, s
    cdef uint64_t frame_len, total, have, remaining, skip, pos, n, lo, acc = 0
    cdef bint needs_csum, complete, retried = False
    cdef const uint8_t *p
    cdef RxCursor cur
    cdef int rc
    cdef int64_t wrc

    if tc.readable_len < NET_HDR_LEN + NET_ETH_HLEN:
        stats.drop_malformed += 1
        return consume(work, stats)
    tx.copy_from_chain(tc, 0, hdr, NET_HDR_LEN)
    frame_len = tc.readable_len - NET_HDR_LEN
    flags = hdr[0]
    gso_type = hdr[1]
    gso_size = rd16(hdr + 4)
    csum_start = rd16(hdr + 6)
    csum_offset = rd16(hdr + 8)
    needs_csum = (flags & HDR_F_NEEDS_CSUM) != 0
    gso = gso_type & ~GSO_ECN

    if needs_csum and <uint64_t>csum_start + csum_offset + 2 > frame_len:
        stats.drop_malformed += 1
        return consume(work, stats)
    if gso == GSO_NONE:
        if gso_type != GSO_NONE:                # the ECN bit alone
            stats.drop_malformed += 1
            return consume(work, stats)
        if frame_len > cfg.max_frame:
            stats.drop_mtu += 1
            return consume(work, stats)
    else:
        if frame_len > NET_MAX_GSO_FRAME or not needs_csum or gso_size == 0:
            stats.drop_malformed += 1
            return consume(work, stats)
        if gso == GSO_TCPV4:
            need = NET_GSO_OK_TCPV4
        elif gso == GSO_TCPV6:
            need = NET_GSO_OK_TCPV6
        elif gso == GSO_UDP:
            need = NET_GSO_OK_UDP
        elif gso == GSO_UDP_L4:
            # USO4 or USO6 by the IP version; one VLAN tag is looked through.
            tx.copy_from_chain(tc, NET_HDR_LEN + 12, raw, 2)
            ethertype = (raw[0] << 8) | raw[1]
            if (ethertype == ETHERTYPE_VLAN or ethertype == ETHERTYPE_QINQ) and frame_len >= 18:
                tx.copy_from_chain(tc, NET_HDR_LEN + 16, raw, 2)
                ethertype = (raw[0] << 8) | raw[1]
            if ethertype == ETHERTYPE_IPV4:
                need = NET_GSO_OK_USO4
            elif ethertype == ETHERTYPE_IPV6:
                need = NET_GSO_OK_USO6
            else:
                stats.drop_malformed += 1
                return consume(work, stats)
        else:
            stats.drop_malformed += 1
            return consume(work, stats)
        if gso_type & GSO_ECN:
            need |= NET_GSO_OK_ECN
        if not cfg.guest_csum or (cfg.gso_ok & need) != need:
            stats.drop_gso += 1
            return consume(work, stats)
        if (transport_header_len(tx, tc, gso, csum_start, frame_len, &thl) < 0 or csum_start + thl > frame_len
                or csum_start + thl > 0xFFFF):
            stats.drop_malformed += 1
            return consume(work, stats)

    # The receive header (num_buffers filled in once the buffers are known).
    memset(out, 0, NET_HDR_LEN)
    complete = needs_csum and not cfg.guest_csum
    if needs_csum and cfg.guest_csum:
        out[0] = HDR_F_NEEDS_CSUM
        wr16(out + 6, csum_start)
        wr16(out + 8, csum_offset)
    if gso != GSO_NONE:
        out[1] = gso_type
        wr16(out + 2, <uint16_t>(csum_start + thl))
        wr16(out + 4, gso_size)

    # Take RX buffers for header + frame.
    total = NET_HDR_LEN + frame_len
    first = work.n_rx
    while True:
        have = 0
        slots = 0
        rc = POP_NO_SPACE           # what running into rx_cap counts as
        while work.n_rx < work.rx_cap:
            c = &work.rx[work.n_rx]
            rc = rx.pop(c)
            if rc != POP_CHAIN:
                break
            work.n_rx += 1
            if not cfg.mrg_rxbuf:
                if c.writable_len < total:
                    rc = give_back_rx(rx, work, first, stats)
                    if rc < 0:
                        return rc
                    stats.drop_rx_small += 1
                    return consume(work, stats)
                have = total
                break
            have += c.writable_len
            slots += ring_slots(rx, c)
            if have >= total:
                break
        if have >= total:
            break
        if rc < 0:
            stats.failed_queue = 1
            work.n_rx = first
            return rc
        if rc == POP_CHAIN:
            rc = POP_NO_SPACE
        # Not enough buffers now: hand back what this frame took, then decide.
        if give_back_rx(rx, work, first, stats) < 0:
            return VQ_ERR_CHAIN
        if first > 0 and not retried:
            # Buffers of earlier frames are held for the batch: push them (and their TX chains)
            # so the ring slots and the segment arena are free, then try this frame once more.
            c = tc
            rc = flush(tx, rx, work, stats)
            if rc < 0:
                return rc
            if c != &work.tx[0]:
                work.tx[0] = c[0]
            tc = &work.tx[0]
            first = 0
            retried = True
            continue
        if rc == POP_NO_SPACE or slots >= rx.num:
            # This frame alone holds every slot of the RX ring (or all its segment room) and
            # still does not fit: the driver can never post more. Drop it.
            stats.drop_rx_small += 1
            return consume(work, stats)
        rc = tx.unpop(tc)
        if rc < 0:
            stats.failed_queue = 0
            return rc
        stats.rx_starved = 1
        return FRAME_RX_EMPTY

    # Used lengths: every buffer but the last full (§5.1.6.4.1).
    nb = work.n_rx - first
    remaining = total
    for i in range(first, work.n_rx):
        n = work.rx[i].writable_len if work.rx[i].writable_len < remaining else remaining
        work.rx_written[i] = <uint32_t>n
        remaining -= n
    wr16(out + 10, <uint16_t>nb)

    rx_seek(work.rx_written, first, work.n_rx, 0, &cur)
    wrc = rx_write(rx, work.rx, work.rx_written, work.n_rx, &cur, out, NET_HDR_LEN)
    # The frame, TX segment by TX segment, summed on the way when the checksum is ours to finish.
    skip = NET_HDR_LEN
    pos = 0
    for s in range(tc.n_readable):
        if wrc < 0:
            break
        seg = &tc.segs[s]
        if skip >= seg.len:
            skip -= seg.len
            continue
        p = seg.ptr + skip
        n = seg.len - skip
        skip = 0
        wrc = rx_write(rx, work.rx, work.rx_written, work.n_rx, &cur, p, n)
        if complete and pos + n > csum_start:
            lo = csum_start if csum_start > pos else pos
            acc = csum_add(acc, p + (lo - pos), pos + n - lo, lo - csum_start)
        pos += n
    if wrc >= 0 and complete:
        csum = csum_fold(acc)
        raw[0] = csum >> 8                   # network byte order
        raw[1] = csum & 0xFF
        rx_seek(work.rx_written, first, work.n_rx, NET_HDR_LEN + <uint64_t>csum_start + csum_offset, &cur)
        wrc = rx_write(rx, work.rx, work.rx_written, work.n_rx, &cur, raw, 2)
    if wrc < 0:
        stats.failed_queue = 1
        work.n_rx = first
        return <int>wrc
    stats.frames += 1
    stats.bytes += frame_len
    stats.rx_used += nb
    return consume(work, stats)


cdef int net_loopback(VirtQueue tx, VirtQueue rx, const NetLoopbackConfig *cfg, LoopbackWork *work,
                      LoopbackStats *stats) noexcept nogil:
    cdef uint32_t budget = cfg.budget if cfg.budget else (tx.num if tx.num else 1)
    cdef uint32_t taken = 0
    cdef int rc, result = 0
    stats.failed_queue = -1
    if work.tx == NULL or work.rx == NULL or work.rx_cap < rx.num:
        return NET_ERR_WORK
    work.n_tx = 0
    work.n_rx = 0
    while True:
        if taken >= budget:
            stats.more = 1
            result = 1
            break
        rc = tx.pop(&work.tx[work.n_tx])
        if rc == POP_EMPTY:
            break
        if rc == POP_NO_SPACE:
            if work.n_tx == 0:
                break            # the arena is held by chains that are not ours: nothing to do
            rc = flush(tx, rx, work, stats)
            if rc < 0:
                break
            continue
        if rc < 0:
            stats.failed_queue = 0
            break
        taken += 1
        rc = deliver_frame(tx, rx, cfg, work, stats)
        if rc != FRAME_DONE:
            break
        if work.n_tx == NET_TX_BATCH:
            rc = flush(tx, rx, work, stats)
            if rc < 0:
                break
    if rc < 0:
        flush(tx, rx, work, stats)   # best effort: completed frames still reach the driver
        return rc
    rc = flush(tx, rx, work, stats)
    if rc < 0:
        return rc
    rc = tx.need_notify()
    if rc < 0:
        stats.failed_queue = 0
        return rc
    stats.notify_tx = rc
    rc = rx.need_notify()
    if rc < 0:
        stats.failed_queue = 1
        return rc
    stats.notify_rx = rc
    return result


def gso_ok_from_features(features: int) -> int:
    """The GSO_OK_* mask for the receive-side GSO features negotiated in ``features``."""
    features = int(features)
    mask = 0
    for bit, ok in ((VIRTIO_NET_F_GUEST_TSO4, NET_GSO_OK_TCPV4), (VIRTIO_NET_F_GUEST_TSO6, NET_GSO_OK_TCPV6),
                    (VIRTIO_NET_F_GUEST_UFO, NET_GSO_OK_UDP), (VIRTIO_NET_F_GUEST_USO4, NET_GSO_OK_USO4),
                    (VIRTIO_NET_F_GUEST_USO6, NET_GSO_OK_USO6), (VIRTIO_NET_F_GUEST_ECN, NET_GSO_OK_ECN)):
        if features >> bit & 1:
            mask |= ok
    return mask


cdef dict _stats_dict(const LoopbackStats *s):
    return {"frames": s.frames, "bytes": s.bytes, "drop_mtu": s.drop_mtu, "drop_malformed": s.drop_malformed,
            "drop_gso": s.drop_gso, "drop_rx_small": s.drop_rx_small, "tx_used": s.tx_used,
            "rx_used": s.rx_used}


cdef class NetLoopback:
    """The loopback of one queue pair, with its configuration and batch scratch.

    ``run(tx, rx)`` moves frames until TX is empty, RX has no room, or ``budget`` TX chains
    were taken (``more``), and returns ``(frames, bytes, notify_tx, notify_rx)``. Ring
    violations raise :class:`VirtQueueError` with ``queue`` (``"tx"``/``"rx"``) and
    ``queue_index`` attached; the queue is broken and the device should set DEVICE_NEEDS_RESET.
    """

    def __cinit__(self, *args, **kwargs):
        self.work.tx = <Chain *>PyMem_Malloc(NET_TX_BATCH * sizeof(Chain))
        self.work.tx_written = <uint32_t *>PyMem_Malloc(NET_TX_BATCH * sizeof(uint32_t))
        self.work.rx = NULL
        self.work.rx_written = NULL
        self.work.rx_cap = 0
        if self.work.tx == NULL or self.work.tx_written == NULL:
            raise MemoryError()
        memset(&self.total, 0, sizeof(LoopbackStats))
        memset(&self.last, 0, sizeof(LoopbackStats))
        self.last.failed_queue = -1

    def __dealloc__(self):
        PyMem_Free(self.work.tx)
        PyMem_Free(self.work.tx_written)
        PyMem_Free(self.work.rx)
        PyMem_Free(self.work.rx_written)

    def __init__(self, *, bint mrg_rxbuf=False, bint guest_csum=False, unsigned int gso_ok=0, int mtu=1500,
                 unsigned int budget=0):
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise OSError(errno.EINVAL, f"mtu {mtu} is not in [{MIN_MTU}, {MAX_MTU}]")
        if gso_ok & ~(NET_GSO_OK_TCPV4 | NET_GSO_OK_TCPV6 | NET_GSO_OK_UDP | NET_GSO_OK_USO4 | NET_GSO_OK_USO6
                      | NET_GSO_OK_ECN):
            raise OSError(errno.EINVAL, f"unknown GSO_OK bits in {gso_ok:#x}")
        self.cfg.mrg_rxbuf = mrg_rxbuf
        self.cfg.guest_csum = guest_csum
        self.cfg.gso_ok = gso_ok
        self.cfg.max_frame = mtu + NET_ETH_HLEN
        self.cfg.budget = budget

    @classmethod
    def from_features(cls, features: int, mtu: int = 1500, budget: int = 0) -> NetLoopback:
        """Configured from the negotiated feature bits (MRG_RXBUF, GUEST_CSUM, GUEST_TSO*/UFO/USO*/ECN)."""
        features = int(features)
        return cls(mrg_rxbuf=bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1),
                   guest_csum=bool(features >> VIRTIO_NET_F_GUEST_CSUM & 1),
                   gso_ok=gso_ok_from_features(features), mtu=mtu, budget=budget)

    cdef int _reserve(self, uint32_t rx_num) except -1:
        cdef Chain *chains
        cdef uint32_t *written
        if rx_num <= self.work.rx_cap:
            return 0
        chains = <Chain *>PyMem_Realloc(self.work.rx, rx_num * sizeof(Chain))
        if chains == NULL:
            raise MemoryError()
        self.work.rx = chains
        written = <uint32_t *>PyMem_Realloc(self.work.rx_written, rx_num * sizeof(uint32_t))
        if written == NULL:
            raise MemoryError()
        self.work.rx_written = written
        self.work.rx_cap = rx_num
        return 0

    def run(self, VirtQueue tx not None, VirtQueue rx not None) -> tuple:
        """Loop TX frames back to RX: ``(frames, bytes, notify_tx, notify_rx)`` of this call."""
        cdef int rc
        cdef VirtQueue failed
        self._reserve(rx.num if rx.num else 1)
        memset(&self.last, 0, sizeof(LoopbackStats))
        rc = net_loopback(tx, rx, &self.cfg, &self.work, &self.last)
        self.total.frames += self.last.frames
        self.total.bytes += self.last.bytes
        self.total.drop_mtu += self.last.drop_mtu
        self.total.drop_malformed += self.last.drop_malformed
        self.total.drop_gso += self.last.drop_gso
        self.total.drop_rx_small += self.last.drop_rx_small
        self.total.tx_used += self.last.tx_used
        self.total.rx_used += self.last.rx_used
        if rc < 0:
            failed = rx if self.last.failed_queue == 1 else tx
            fault = failed.access_fail if rc in (VQ_BAD_UNMAPPED, VQ_BAD_DENIED) else None
            error = VirtQueueError(rc, fault)
            error.queue = "rx" if self.last.failed_queue == 1 else "tx"
            error.queue_index = failed.index
            raise error
        return (self.last.frames, self.last.bytes, self.last.notify_tx == 1, self.last.notify_rx == 1)

    @property
    def more(self) -> bool:
        """The last run stopped at its budget: call again."""
        return bool(self.last.more)

    @property
    def rx_starved(self) -> bool:
        """The last run stopped because RX had no room: resume on the next RX kick."""
        return bool(self.last.rx_starved)

    @property
    def stats(self) -> dict:
        """Counters over every run: frames, bytes, drop_mtu, drop_malformed, drop_gso, drop_rx_small, ..."""
        return _stats_dict(&self.total)

    @property
    def last_stats(self) -> dict:
        return _stats_dict(&self.last)

    @property
    def config(self) -> dict:
        return {"mrg_rxbuf": bool(self.cfg.mrg_rxbuf), "guest_csum": bool(self.cfg.guest_csum),
                "gso_ok": self.cfg.gso_ok, "mtu": self.cfg.max_frame - NET_ETH_HLEN, "budget": self.cfg.budget}


def loopback(VirtQueue tx not None, VirtQueue rx not None, bint mrg_rxbuf=False, bint guest_csum=False,
             int mtu=1500, *, unsigned int gso_ok=0, unsigned int budget=0) -> tuple:
    """One loopback pass with a throwaway :class:`NetLoopback`: ``(frames, bytes, notify_tx, notify_rx)``."""
    return NetLoopback(mrg_rxbuf=mrg_rxbuf, guest_csum=guest_csum, gso_ok=gso_ok, mtu=mtu, budget=budget).run(tx, rx)
