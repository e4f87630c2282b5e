"""sim-net: the reference virtio-net vDPA device, a loopback NIC behind a :class:`SimDevice`.

The device is Linux's ``vdpa_sim_net`` made to follow the spec (virtio v1.3 §5.1): every frame the
driver transmits on transmitqN comes back on receiveqN, in order, with its virtio_net_hdr (the
compiled loop in :mod:`vdpacert.impl.net_datapath`, whose docstring lists every datapath choice),
and a control virtqueue answers MAC_ADDR_SET, VQ_PAIRS_SET and the RX-mode commands
(:mod:`vdpacert.impl.net_ctrl`).

Queues (§5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq, with N =
``max_vq_pairs``; the device has 2N + 1 of them. The controlq is queue 2N only when
VIRTIO_NET_F_MQ is negotiated; without MQ the driver uses one pair and the controlq is queue 2
(queues 3 .. 2N then do not exist for this driver and are never processed). Which index is the
controlq therefore follows the driver's features, as it does on real multiqueue parents.

Groups and address spaces (like ``vdpa_sim_net``): data queues are in group 0 and the controlq
alone in group 1, with two address spaces, so userspace can give the controlq its own ASID
(QEMU's shadow control virtqueue). The group of each index follows the controlq's index.

Which pairs carry traffic (§5.1.6.5.5): without MQ only pair 1; with MQ pair 1 until the driver
sends VQ_PAIRS_SET, then the pairs it set. A kick on either queue of an active pair runs that
pair's loopback until TX is empty or RX is full; a kick on an inactive pair is ignored (its
frames wait in the TX ring and move when VQ_PAIRS_SET activates the pair, which runs it once).

Config space (``struct virtio_net_config``, 24 bytes, little-endian): mac, status (LINK_UP),
max_virtqueue_pairs, mtu, speed 0xFFFFFFFF and duplex 0xFF (unknown; SPEED_DUPLEX is not
offered), the RSS fields 0. Read-only to the driver: writing mac into config space is the
legacy interface's mechanism (§5.1.4.3); a VERSION_1 driver sends MAC_ADDR_SET on the controlq,
which updates config space and fires the config callback.

Offered by default: VERSION_1, ACCESS_PLATFORM, RING_PACKED, EVENT_IDX, INDIRECT_DESC,
VHOST_F_LOG_ALL and CSUM, GUEST_CSUM, MTU, MAC, MRG_RXBUF, STATUS, CTRL_VQ, CTRL_RX,
CTRL_RX_EXTRA, CTRL_MAC_ADDR (+ MQ with more than one pair). A ``features`` attribute replaces the
offer with a subset of :data:`SUPPORTED_FEATURES` (which must still pass the spec's offer
check: no feature without one it needs).

Management device ``sim-net`` (:data:`MGMTDEV`, loaded by :mod:`vdpacert.impl.bus`): attributes
``mac``, ``mtu``, ``max_vq_pairs``, ``queue_size``, ``features``, and vdpa_sim's module parameters
``batch_mapping`` (1, the default: mappings arrive by set_map; 0: by dma_map / dma_unmap) and
``max_iotlb_entries`` (per address space, 2048 by default, 0 for no cap); :func:`create` is its factory.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct

from vdpacert.impl.bus import MgmtDev
from vdpacert.impl.net_ctrl import NetCtrlState, process_ctrl_queue
from vdpacert.impl.net_datapath import NetLoopback
from vdpacert.impl.sim_device import TRANSPORT_FEATURES, SimDevice, feature_word, iotlb_cap
from vdpacert.impl.virtqueue import VirtQueueError
from vdpacert.uapi import virtio_net as N  # noqa: N812 - read like the C names: N.VIRTIO_NET_F_MQ
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

DEFAULT_MTU = 1500
DEFAULT_QUEUE_SIZE = 256
#: Most queue pairs one sim-net device has: the spec's limit (a pair's loopback is built on first use).
MAX_VQ_PAIRS = N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX
#: Groups: data queues, then the controlq on its own (vdpa_sim_net's layout).
DATA_GROUP = 0
CVQ_GROUP = 1
NGROUPS = 2
NAS = 2
#: struct virtio_net_config values the device cannot know (§5.1.4: speed and duplex "unknown").
SPEED_UNKNOWN = 0xFFFFFFFF
DUPLEX_UNKNOWN = 0xFF


#: The default offer of a single-pair device.
DEFAULT_FEATURES = TRANSPORT_FEATURES | feature_word(
    N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM,
    N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_STATUS,
    N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_RX_EXTRA, N.VIRTIO_NET_F_CTRL_MAC_ADDR)
#: Everything a ``features`` attribute may name: the default offer and MQ.
SUPPORTED_FEATURES = DEFAULT_FEATURES | feature_word(N.VIRTIO_NET_F_MQ)


def default_mac(name: str) -> bytes:
    """A locally administered unicast MAC derived from the device name (unique per name on a bus).

    Derived rather than counted so a device gets the same MAC in every process and test run.
    """
    digest = hashlib.sha256(name.encode()).digest()
    return bytes([0x02, 0x00]) + digest[:4]


def net_config(*, mac: bytes, max_virtqueue_pairs: int, mtu: int, status: int = N.VIRTIO_NET_S_LINK_UP) -> bytes:
    """``struct virtio_net_config`` as the device presents it."""
    config = bytearray(N.VIRTIO_NET_CONFIG_SIZE)
    config[N.VIRTIO_NET_CONFIG_MAC:N.VIRTIO_NET_CONFIG_MAC + 6] = mac
    struct.pack_into("<H", config, N.VIRTIO_NET_CONFIG_STATUS, status)
    struct.pack_into("<H", config, N.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS, max_virtqueue_pairs)
    struct.pack_into("<H", config, N.VIRTIO_NET_CONFIG_MTU, mtu)
    struct.pack_into("<I", config, N.VIRTIO_NET_CONFIG_SPEED, SPEED_UNKNOWN)
    config[N.VIRTIO_NET_CONFIG_DUPLEX] = DUPLEX_UNKNOWN
    return bytes(config)


def rx_index(pair: int) -> int:
    """receiveq(pair + 1)."""
    return 2 * pair


def tx_index(pair: int) -> int:
    """transmitq(pair + 1)."""
    return 2 * pair + 1


class SimNet(SimDevice):
    """A loopback virtio-net device (see the module docstring).

    ``mac`` defaults to :func:`default_mac` of the name; ``features`` replaces the default offer
    (a subset of :data:`SUPPORTED_FEATURES`); ``batch_mapping`` and ``max_iotlb_entries`` are
    :class:`SimDevice`'s (None: its default). ValueError for any attribute the device cannot honour.
    """

    def __init__(self, name: str = "sim-net", *, mac: bytes | None = None, mtu: int = DEFAULT_MTU,
                 max_vq_pairs: int = 1, queue_size: int = DEFAULT_QUEUE_SIZE, features: int | None = None,
                 batch_mapping: bool | None = None, max_iotlb_entries: int | None = None) -> None:
        if not 1 <= max_vq_pairs <= MAX_VQ_PAIRS:
            raise ValueError(f"max_vq_pairs {max_vq_pairs} is not in [1, {MAX_VQ_PAIRS}]")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} is not in [68, 65535]")
        mac = default_mac(name) if mac is None else bytes(mac)
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"mac {mac.hex(':')} is not a unicast Ethernet address")
        if features is None:
            offered = DEFAULT_FEATURES | (1 << N.VIRTIO_NET_F_MQ if max_vq_pairs > 1 else 0)
        else:
            if features & ~SUPPORTED_FEATURES:
                raise ValueError(f"sim-net cannot offer features {features & ~SUPPORTED_FEATURES:#x}")
            offered = features
        if max_vq_pairs > 1 and not offered >> N.VIRTIO_NET_F_MQ & 1:
            raise ValueError(f"{max_vq_pairs} queue pairs need VIRTIO_NET_F_MQ in the offer")
        self.mac = mac
        self.mtu = mtu
        self.max_vq_pairs = max_vq_pairs
        #: What the controlq changed (mac, active pairs, RX modes, MAC tables); reset restores it.
        self.ctrl = NetCtrlState(mac=mac, max_virtqueue_pairs=max_vq_pairs)
        # Per-pair loopbacks, built on a pair's first run after FEATURES_OK (None: not negotiated yet).
        self._loopbacks: dict[int, NetLoopback] | None = None
        nvqs = 2 * max_vq_pairs + 1
        config = net_config(mac=mac, max_virtqueue_pairs=max_vq_pairs, mtu=mtu)
        super().__init__(name, device_id=VIRTIO_ID_NET, offered=offered, config=config, nvqs=nvqs,
                         ngroups=NGROUPS, nas=NAS, vq_groups=self._groups_for(0, nvqs), queue_size=queue_size,
                         batch_mapping=batch_mapping, **iotlb_cap(max_iotlb_entries))

    # ----- queue layout, as the driver's features make it ------------------------------------------

    def _usable_pairs(self, features: int) -> int:
        """Pairs that exist for a driver with ``features`` (§5.1.2: N is 1 without MQ)."""
        return self.max_vq_pairs if features >> N.VIRTIO_NET_F_MQ & 1 else 1

    def _groups_for(self, features: int, nvqs: int) -> list[int]:
        ctrl = 2 * (self.max_vq_pairs if features >> N.VIRTIO_NET_F_MQ & 1 else 1)
        return [CVQ_GROUP if index == ctrl else DATA_GROUP for index in range(nvqs)]

    @property
    def ctrl_vq_index(self) -> int:
        """The controlq's queue index for the driver's current features."""
        return 2 * self._usable_pairs(self.features)

    @property
    def active_pairs(self) -> int:
        """Pairs that carry traffic now (1 without MQ; the VQ_PAIRS_SET value with it)."""
        if not self.features >> N.VIRTIO_NET_F_MQ & 1:
            return 1
        return self.ctrl.active_pairs

    def _relayout(self) -> None:
        self.set_vq_groups(self._groups_for(self.features, self.nvqs))

    def set_driver_features(self, features: int) -> None:
        super().set_driver_features(features)
        self._relayout()

    # ----- SimDevice hooks -------------------------------------------------------------------------

    def features_ok(self, features: int) -> None:
        # The loopbacks' receive-side options (MRG_RXBUF, GUEST_CSUM, GSO) follow the final features.
        self._loopbacks = {}

    def reset_device(self) -> None:
        self.ctrl.reset(mac=self.mac)
        self._loopbacks = None
        self._relayout()

    def _loopback(self, pair: int) -> NetLoopback | None:
        if self._loopbacks is None:
            return None
        loop = self._loopbacks.get(pair)
        if loop is None:
            loop = self._loopbacks[pair] = NetLoopback.from_features(self.features, self.mtu)
        return loop

    def loopback_stats(self, pair: int = 0) -> dict[str, int]:
        """The datapath counters of ``pair`` since FEATURES_OK (frames, bytes, drops ...); zeros before."""
        loop = self._loopbacks.get(pair) if self._loopbacks is not None else None
        if loop is None:
            return dict.fromkeys(("frames", "bytes", "drop_mtu", "drop_malformed", "drop_gso", "drop_rx_small",
                                  "tx_used", "rx_used"), 0)
        return dict(loop.stats)

    def process(self, index: int) -> None:
        features = self.features
        if index == self.ctrl_vq_index:
            if features >> N.VIRTIO_NET_F_CTRL_VQ & 1:
                self._process_ctrl(index)
            return
        pair = index // 2
        if pair < self.active_pairs:
            self._process_pair(pair, index)

    # ----- data pairs --------------------------------------------------------------------------------

    def _take_restored(self, index: int) -> None:
        """Rewind a restored queue's in-flight chains before its pair runs.

        The base does this for the queue it was asked to run; a pair runs both of its queues, so
        the partner (e.g. TX when RX was kicked first after SET_VRING_BASE) is rewound here.
        """
        cfg, vq = self.vq_config(index), self.vq(index)
        if cfg.restored and vq.ready and not vq.broken:
            cfg.restored = False
            with contextlib.suppress(VirtQueueError, OSError):  # a failure broke the queue: reported after
                vq.rewind_inflight()

    def _process_pair(self, pair: int, kicked: int) -> None:
        rx_i, tx_i = rx_index(pair), tx_index(pair)
        rx, tx = self.vq(rx_i), self.vq(tx_i)
        other = tx_i if kicked == rx_i else rx_i
        if not (self.vq_config(rx_i).ready and self.vq_config(tx_i).ready and rx.ready and tx.ready):
            return  # the partner is not enabled yet: its enable runs the pair
        loop = self._loopback(pair)
        if loop is None:
            return
        self._take_restored(other)
        notify_rx = notify_tx = False
        try:
            while not rx.broken and not tx.broken:
                _, _, n_tx, n_rx = loop.run(tx, rx)
                notify_tx |= n_tx
                notify_rx |= n_rx
                if not loop.more:
                    break
        except VirtQueueError:
            if not (rx.broken or tx.broken):  # a device bug, not bad input
                raise
        # run() already asked the queues whether to notify (that consumes their counters), so the
        # signals are sent here; the base's own check of `kicked` then finds nothing new.
        if notify_tx:
            self.signal_callback(self.vq_config(tx_i).cb)
        if notify_rx:
            self.signal_callback(self.vq_config(rx_i).cb)
        # The base finishes the kicked queue; the partner (broken, or with completions whose
        # notification a failed run never decided) is finished here the same way.
        self.finish_queue(other)

    def _run_pair(self, pair: int) -> None:
        """Run a pair that just became active (its frames may have waited in the TX ring)."""
        self.run_queue(rx_index(pair))

    # ----- control queue -----------------------------------------------------------------------------

    def _process_ctrl(self, index: int) -> None:
        before_mac, before_pairs = self.ctrl.mac, self.active_pairs
        result = None
        try:
            result = process_ctrl_queue(self.vq(index), self.ctrl, self.features)
        finally:
            # Commands acked before a ring violation took effect: reflect them even then.
            if self.ctrl.mac != before_mac:
                self.update_config(N.VIRTIO_NET_CONFIG_MAC, self.ctrl.mac)
        if result is not None and result.notify:
            self.signal_callback(self.vq_config(index).cb)
        for pair in range(before_pairs, self.active_pairs):
            self._run_pair(pair)


def create(name: str, *, mac: bytes | None = None, mtu: int = DEFAULT_MTU, max_vq_pairs: int = 1,
           queue_size: int = DEFAULT_QUEUE_SIZE, features: int | None = None, batch_mapping: bool | None = None,
           max_iotlb_entries: int | None = None) -> SimNet:
    """The management device's factory: ``vdpa dev add name NAME mgmtdev sim-net [attr value ...]``."""
    return SimNet(name, mac=mac, mtu=mtu, max_vq_pairs=max_vq_pairs, queue_size=queue_size, features=features,
                  batch_mapping=batch_mapping, max_iotlb_entries=max_iotlb_entries)


#: The ``sim-net`` management device (registered on the bus by :func:`vdpacert.impl.bus.load_mgmtdevs`).
MGMTDEV = MgmtDev(
    name="sim-net",
    factory=create,
    supported_attrs=frozenset({"mac", "mtu", "max_vq_pairs", "queue_size", "features", "batch_mapping",
                               "max_iotlb_entries"}),
    device_class="net",
    max_supported_vqs=2 * MAX_VQ_PAIRS + 1,
    supported_features=SUPPORTED_FEATURES,
)
