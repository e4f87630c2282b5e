"""The rule catalog: every rule has a stable unique id, a level and a citation."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable

import pytest

from vdpacert.model import blk, config_space, net, rules, vring_packed, vring_split
from vdpacert.model.chains import DeviceRuleBroken
from vdpacert.model.guest_memory import ModelMemory
from vdpacert.model.spec import Citation, Level, LinuxSource, Section, Violation
from vdpacert.uapi import virtio_blk as vb
from vdpacert.uapi import virtio_net as vn
from vdpacert.uapi.virtio_config import VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX


def test_ids_are_unique_and_well_formed() -> None:
    entries = rules.catalog()
    ids = [entry.rule for entry in entries]
    assert len(ids) == len(set(ids))
    for rule_id in ids:
        assert rules.RULE_ID.match(rule_id), rule_id


def test_every_rule_cites_a_section_or_linux_source() -> None:
    for entry in rules.catalog():
        citation = entry.citation
        if isinstance(citation, Section):
            assert citation.number and citation.number[0].isdigit(), entry
            assert citation.version in ("1.3", "1.4"), entry
        else:
            assert isinstance(citation, LinuxSource), entry
            assert citation.path.startswith(("drivers/", "include/uapi/", "include/linux/")), entry
        assert entry.summary, entry


def test_catalog_covers_every_table() -> None:
    sources = {entry.source for entry in rules.catalog()}
    assert {"features", "status", "chains", "notify", "iotlb", "vdpa_device", "vhost_vdpa", "vring_split",
            "vring_packed", "config_space", "net", "blk"} <= sources
    known = rules.by_id()
    assert "net.MQ.requires" in known
    assert "status.driver.never_clears" in known
    assert "ring.bad_input.descriptor_loop" in known


# -- every rule id a net / blk / config / ring outcome carries is catalogued, and vice versa ---------
def _bit(*bits: int) -> int:
    return sum(1 << b for b in bits)


class _Reached:
    """Collects the rule ids outcomes report, checking each against the catalog as it goes."""

    def __init__(self) -> None:
        self.known = rules.by_id()
        self.ids: set[str] = set()

    def rule(self, rule: str, level: Level | None, citation: Citation) -> None:
        assert rule in self.known, rule
        entry = self.known[rule]
        assert entry.citation == citation, rule
        if level is not None:  # ConfigWrite carries no level
            assert entry.level is level, rule
        self.ids.add(rule)

    def violations(self, found: Iterable[Violation]) -> None:
        for v in found:
            self.rule(v.rule, v.level, v.citation)

    def of(self, *sources: str) -> set[str]:
        return {e.rule for e in self.known.values() if e.source in sources}


def _blk_outcomes(seen: _Reached) -> None:
    cap = 16
    blk_all = _bit(vb.VIRTIO_BLK_F_FLUSH, vb.VIRTIO_BLK_F_DISCARD, vb.VIRTIO_BLK_F_WRITE_ZEROES)
    limited = {"max_discard_seg": 1, "max_discard_sectors": 4, "max_write_zeroes_seg": 1,
               "max_write_zeroes_sectors": 4}
    models = (blk.BlkDiskModel(capacity=cap, serial=b"s"), blk.BlkDiskModel(capacity=cap, read_only=True),
              blk.BlkDiskModel(capacity=cap, **limited))
    seg = blk.discard_segment
    payloads = (b"", bytes(512), b"x" * 100, seg(0, 1), seg(0, 1, 1), seg(0, 1, 2), seg(0, 1) * 2, seg(0, 5),
                seg(cap - 1, 2), seg(0, 1)[:10])
    for model, features, type_, sector, data, writable in itertools.product(
            models, (0, blk_all), (*blk.BLK_REQUEST_TYPES, 2, 99), (0, 5, cap), payloads,
            ([], [1], [513], [101], [20, 1], [10, 1])):
        request = blk.build_request(type_, sector, data)
        for readable in (request, request[:15]):
            out = model.execute(readable, writable, features)
            seen.rule(out.rule, out.level, out.citation)
            seen.violations(out.driver_violations)


def _net_outcomes(seen: _Reached) -> None:
    ctrl = _bit(vn.VIRTIO_NET_F_CTRL_VQ)
    good = {"RX": b"\x01", "MAC_TABLE_SET": struct.pack("<II", 0, 0), "MAC_ADDR_SET": bytes(6),
            "VLAN": b"\x0a\x00", "ANNOUNCE_ACK": b"", "MQ_VQ_PAIRS_SET": struct.pack("<H", 2)}
    bad = {"RX": b"\x02", "MAC_TABLE_SET": b"\x00", "VLAN": struct.pack("<H", 4096),
           "MQ_VQ_PAIRS_SET": struct.pack("<H", 0)}
    state = net.NetDeviceState(max_virtqueue_pairs=4)
    for row in net.CTRL_COMMANDS.values():
        key = next(k for k in good if row.name.startswith(k))
        negotiated = ctrl | _bit(row.feature)
        for features, payload in ((negotiated, good[key]), (ctrl, good[key]), (negotiated, good[key] + b"\0"),
                                  (negotiated, bad.get(key, good[key]))):
            d = net.decide_ctrl(state, features, row.cls, row.cmd, payload)
            seen.rule(d.rule, d.level, d.citation)
            seen.violations(d.driver_violations)
    unknown = net.decide_ctrl(state, ctrl, 200, 0, b"")
    seen.rule(unknown.rule, unknown.level, unknown.citation)

    offered = _bit(vn.VIRTIO_NET_F_MTU, vn.VIRTIO_NET_F_SPEED_DUPLEX)
    for values in ({"mtu": 60}, {"mtu": 576}, {"speed": 0x80000000, "duplex": 2}):
        seen.violations(net.config_violations(net.NetDeviceState(**values), offered))  # type: ignore[arg-type]

    v1 = 1 << VIRTIO_F_VERSION_1
    csum = _bit(vn.VIRTIO_NET_F_CSUM)
    needs = vn.VIRTIO_NET_HDR_F_NEEDS_CSUM
    gso = net.NetHdr(flags=needs, gso_type=vn.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1448, csum_start=34,
                     csum_offset=16)
    mq = v1 | ctrl | _bit(vn.VIRTIO_NET_F_MQ, vn.VIRTIO_NET_F_MTU, vn.VIRTIO_NET_F_HOST_TSO4) | csum
    cases: tuple[tuple[int, int, bytes], ...] = (
        (v1, 1, b"\0" * 11),
        (v1, 1, net.NetHdr(num_buffers=2, flags=2).encode() + b"x"),
        (v1, 1, net.NetHdr(flags=needs, csum_start=0, csum_offset=0).encode() + b"xx"),
        (mq, 2, net.NetHdr().encode() + b"early"),
        (v1, 1, gso.encode() + bytes(3000)),
        (mq, 1, gso.encode() + bytes(3000)),
        (mq, 1, net.NetHdr().encode() + bytes(1515)),
        (v1, 1, net.NetHdr().encode() + bytes(1515)),
        (v1 | csum, 1, net.NetHdr(flags=needs, csum_start=10).encode() + bytes(5)),
    )
    for features, pair, packet in cases:
        out = net.LoopbackNet(features, net.NetDeviceState(max_virtqueue_pairs=2)).transmit(pair, packet)
        seen.rule(out.rule, out.level, out.citation)
        seen.violations(out.driver_violations)
    lo = net.LoopbackNet(v1 | ctrl | _bit(vn.VIRTIO_NET_F_MQ), net.NetDeviceState(max_virtqueue_pairs=2))
    lo.control(vn.VIRTIO_NET_CTRL_MQ, vn.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2))
    lo.transmit(1, net.NetHdr().encode() + bytes(200))
    lo.transmit(2, net.NetHdr().encode() + b"late")
    lo.post_rx(1, 1, 100)
    lo.control(vn.VIRTIO_NET_CTRL_MQ, vn.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1))
    for event in (*lo.deliver(1), *lo.deliver(2)):
        assert isinstance(event, net.RxDrop)
        seen.rule(event.rule, event.level, event.citation)


def _config_outcomes(seen: _Reached) -> None:
    wce = _bit(vb.VIRTIO_BLK_F_CONFIG_WCE)
    for layout, raw in ((net.NET_CONFIG_LAYOUT, net.NetDeviceState().render_config(0)),
                        (blk.BLK_CONFIG_LAYOUT, blk.BlkConfig(capacity=8).render())):
        for name in layout.names():
            f = layout.field(name)
            seen.violations(layout.read(raw, f.offset, f.size, offered=0, features_ok=False).violations)
            for data in (bytes(f.size), b"\x02" * f.size, bytes(f.size + 1)):
                data = data[:len(raw) - f.offset]
                for negotiated in (0, wce):
                    res = layout.write(raw, f.offset, data, negotiated=negotiated)
                    seen.rule(res.rule, None, res.citation)
                    seen.violations(res.violations)
        res = layout.write(raw, 0, b"", negotiated=0)
        seen.rule(res.rule, None, res.citation)


def _ring_outcomes(seen: _Reached) -> None:
    seen.violations(vring_split.split_ring_violations(3, 0x1008, 0x2001, 0x3002))
    seen.violations(vring_packed.packed_ring_violations(0, 0x1008, 0x2002, 0x2001))
    buf = 0x100000
    in_order, event_idx = 1 << VIRTIO_F_IN_ORDER, 1 << VIRTIO_RING_F_EVENT_IDX

    def split(features: int) -> tuple[vring_split.SplitDriver, vring_split.SplitDeviceModel]:
        mem, ring = ModelMemory(), vring_split.SplitRing(4, 0x1000, 0x2000, 0x3000)
        return (vring_split.SplitDriver(mem, ring, features=features),
                vring_split.SplitDeviceModel(mem, ring, features=features))

    def packed(features: int) -> tuple[vring_packed.PackedDriver, vring_packed.PackedDeviceModel]:
        mem, ring = ModelMemory(), vring_packed.PackedRing(5, 0x1000, 0x80000, 0x80010)
        return (vring_packed.PackedDriver(mem, ring, features=features),
                vring_packed.PackedDeviceModel(mem, ring, features=features))

    s_driver, s_device = split(in_order | event_idx)
    s_heads = [s_driver.add([(buf, 8, True)]) for _ in range(2)]
    s_driver.publish()
    s_device.consume()
    s_device.consume()
    p_driver, p_device = packed(in_order)
    p_ids = [p_driver.add([(buf, 8, True)]) for _ in range(2)]
    p_device.consume()
    p_device.consume()
    attempts: tuple[Callable[[], object], ...] = (
        lambda: s_device.complete(s_heads[1], 0), lambda: s_device.complete(s_heads[0], 9),
        lambda: s_device.complete(3, 0), lambda: s_device.set_no_notify(True),
        lambda: split(0)[1].set_avail_event(5),
        lambda: p_device.complete(p_ids[1], 0), lambda: p_device.complete(p_ids[0], 9),
        lambda: p_device.complete(4, 0),
        lambda: packed(0)[1].set_device_event(vring_packed.EventSuppress.at(0, 1, 2)),
    )
    for attempt in attempts:
        with pytest.raises(DeviceRuleBroken) as info:
            attempt()
        seen.violations([info.value.violation])


def test_every_rule_a_device_model_reports_is_catalogued_and_every_one_is_reachable() -> None:
    seen = _Reached()
    _blk_outcomes(seen)
    _net_outcomes(seen)
    _config_outcomes(seen)
    _ring_outcomes(seen)
    # Reported ids were checked against the catalog (id, level, citation) as they came; now the
    # other way: the catalog lists no rule of these modules that no input can reach.
    assert seen.of("blk", "net", "config_space", "vring_split", "vring_packed") - seen.ids == set()
    assert {"blk.OUT.beyond_capacity", "blk.driver.beyond_capacity", "net.ctrl.unknown",
            "net.ctrl.driver.MQ_VQ_PAIRS_SET.bad_value", "config.driver.read_absent_field",
            "blk.config.driver_write.read_only", "ring.split.device.in_order"} <= seen.ids


def test_catalog_lists_each_module_rules_table() -> None:
    known = rules.by_id()
    for module in (net, blk, config_space, vring_split, vring_packed):
        for row in module.RULES:
            assert known[row.rule].citation == row.citation and known[row.rule].level is row.level, row.rule
