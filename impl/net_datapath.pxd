# The virtio-net loopback datapath of sim-net (virtio v1.3 §5.1.6): every frame the driver
# transmits on transmitq N comes back on receiveq N, in order, with a receive-side
# virtio_net_hdr_v1 derived from the transmit one.
#
# How a device uses it from C (nogil, allocates nothing):
#
#     cdef NetLoopbackConfig cfg      # from the negotiated features (NetLoopback.from_features)
#     cdef LoopbackWork work          # caller-owned scratch: tx[NET_TX_BATCH], rx[>= rx.num]
#     cdef LoopbackStats stats        # zeroed by the caller; counters accumulate
#     rc = net_loopback(tx, rx, &cfg, &work, &stats)
#     # rc: 0 stopped (TX empty, or RX empty: stats.rx_starved), 1 budget used up (call again),
#     #     < 0 a VqStatus: stats.failed_queue says which queue broke (0 TX, 1 RX): set
#     #     DEVICE_NEEDS_RESET.  stats.notify_tx / notify_rx: signal the call eventfds.
#
# From Python: NetLoopback(...).run(tx, rx) or loopback(tx, rx, ...) (see net_datapath.pyx).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from vdpacert.impl.virtqueue cimport Chain, VirtQueue

cdef enum:
    NET_HDR_LEN = 12              # struct virtio_net_hdr_v1 (VERSION_1: num_buffers always present)
    NET_ETH_HLEN = 14             # a frame shorter than an Ethernet header is malformed
    NET_TX_BATCH = 64             # TX chains pushed per push_batch
    NET_MAX_GSO_FRAME = 65553     # 64 KiB - 1 IP datagram + Ethernet header + one VLAN tag
    NET_ERR_WORK = -64            # net_loopback(): the caller's LoopbackWork is smaller than the RX queue

# NetLoopbackConfig.gso_ok: which gso_type values the receiving driver negotiated.
cdef enum:
    NET_GSO_OK_TCPV4 = 1          # VIRTIO_NET_F_GUEST_TSO4
    NET_GSO_OK_TCPV6 = 2          # VIRTIO_NET_F_GUEST_TSO6
    NET_GSO_OK_UDP = 4            # VIRTIO_NET_F_GUEST_UFO
    NET_GSO_OK_USO4 = 8           # VIRTIO_NET_F_GUEST_USO4
    NET_GSO_OK_USO6 = 16          # VIRTIO_NET_F_GUEST_USO6
    NET_GSO_OK_ECN = 32           # VIRTIO_NET_F_GUEST_ECN


cdef struct NetLoopbackConfig:
    uint8_t mrg_rxbuf             # VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX buffers
    uint8_t guest_csum            # VIRTIO_NET_F_GUEST_CSUM: NEEDS_CSUM is passed to the receiver
    uint32_t gso_ok               # NET_GSO_OK_* mask (only honoured with guest_csum)
    uint32_t max_frame            # mtu + NET_ETH_HLEN: longest non-GSO frame delivered
    uint32_t budget               # most TX chains taken per call; 0: the TX queue size


cdef struct LoopbackStats:
    uint64_t frames               # frames delivered
    uint64_t bytes                # their bytes (frame only, without the virtio_net_hdr)
    uint64_t drop_mtu             # non-GSO frame over max_frame
    uint64_t drop_malformed       # no header, runt, bad csum_start/offset, GSO without NEEDS_CSUM ...
    uint64_t drop_gso             # GSO type the receiver did not negotiate
    uint64_t drop_rx_small        # no RX buffer (set) can ever hold it (see net_datapath.pyx)
    uint64_t tx_used              # TX chains returned (delivered + dropped)
    uint64_t rx_used              # RX chains returned
    int notify_tx                 # 1: signal the TX queue's call eventfd
    int notify_rx                 # 1: signal the RX queue's call eventfd
    int more                      # 1: stopped at the budget with TX chains maybe left
    int rx_starved                # 1: stopped because RX had no (or not enough) buffers
    int failed_queue              # -1, or 0 (TX) / 1 (RX): the queue the error came from


cdef struct LoopbackWork:
    Chain *tx                     # NET_TX_BATCH entries
    uint32_t *tx_written
    uint32_t n_tx
    Chain *rx                     # rx_cap entries; rx_cap >= the RX queue size
    uint32_t *rx_written
    uint32_t rx_cap
    uint32_t n_rx


cdef int net_loopback(VirtQueue tx, VirtQueue rx, const NetLoopbackConfig *cfg, LoopbackWork *work,
                      LoopbackStats *stats) noexcept nogil


cdef class NetLoopback:
    cdef NetLoopbackConfig cfg
    cdef LoopbackWork work
    cdef LoopbackStats total      # cumulative over run() calls
    cdef LoopbackStats last       # the last run()
    cdef int _reserve(self, uint32_t rx_num) except -1
