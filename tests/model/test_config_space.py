"""Config layouts: exact bytes for net and blk, field presence, and the read / write rules."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import sections
from vdpacert.model.blk import BLK_CONFIG_LAYOUT, BlkConfig
from vdpacert.model.config_space import (
    READ_ABSENT_FIELD,
    ConfigAccessError,
    ConfigField,
    ConfigWriteRules,
    Presence,
    build_layout,
)
from vdpacert.model.net import NET_CONFIG_LAYOUT, NetDeviceState
from vdpacert.model.spec import Level, Rule
from vdpacert.uapi import virtio_blk as vb
from vdpacert.uapi import virtio_net as vn


def bit(*bits: int) -> int:
    return sum(1 << b for b in bits)


NET_ALL = bit(vn.VIRTIO_NET_F_MAC, vn.VIRTIO_NET_F_STATUS, vn.VIRTIO_NET_F_MQ, vn.VIRTIO_NET_F_MTU,
              vn.VIRTIO_NET_F_SPEED_DUPLEX, vn.VIRTIO_NET_F_CTRL_VQ)


# -- the tables match the UAPI offsets and sizes -----------------------------------------------
def test_net_layout_offsets_match_uapi() -> None:
    lay = NET_CONFIG_LAYOUT
    assert lay.size == vn.VIRTIO_NET_CONFIG_SIZE == 24
    assert (lay.field("mac").offset, lay.field("mac").size) == (vn.VIRTIO_NET_CONFIG_MAC, 6)
    assert lay.field("status").offset == vn.VIRTIO_NET_CONFIG_STATUS
    assert lay.field("max_virtqueue_pairs").offset == vn.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS
    assert lay.field("mtu").offset == vn.VIRTIO_NET_CONFIG_MTU
    assert lay.field("speed").offset == vn.VIRTIO_NET_CONFIG_SPEED
    assert lay.field("duplex").offset == vn.VIRTIO_NET_CONFIG_DUPLEX
    assert max(lay.field(n).end for n in lay.names()) == 24


def test_blk_layout_offsets_match_uapi() -> None:
    lay = BLK_CONFIG_LAYOUT
    assert lay.size == vb.VIRTIO_BLK_CONFIG_SIZE == 96
    expected = {
        "capacity": (vb.VIRTIO_BLK_CONFIG_CAPACITY, 8), "size_max": (vb.VIRTIO_BLK_CONFIG_SIZE_MAX, 4),
        "seg_max": (vb.VIRTIO_BLK_CONFIG_SEG_MAX, 4),
        "geometry.cylinders": (vb.VIRTIO_BLK_CONFIG_GEOMETRY, 2),
        "blk_size": (vb.VIRTIO_BLK_CONFIG_BLK_SIZE, 4), "writeback": (vb.VIRTIO_BLK_CONFIG_WRITEBACK, 1),
        "num_queues": (vb.VIRTIO_BLK_CONFIG_NUM_QUEUES, 2),
        "max_discard_sectors": (vb.VIRTIO_BLK_CONFIG_MAX_DISCARD_SECTORS, 4),
        "max_discard_seg": (vb.VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG, 4),
        "discard_sector_alignment": (vb.VIRTIO_BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT, 4),
        "max_write_zeroes_sectors": (vb.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS, 4),
        "max_write_zeroes_seg": (vb.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SEG, 4),
        "write_zeroes_may_unmap": (vb.VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP, 1),
    }
    for name, (offset, size) in expected.items():
        assert (lay.field(name).offset, lay.field(name).size) == (offset, size), name
    # The fields tile the 96 bytes with no gap and no overlap.
    covered = sorted((lay.field(n).offset, lay.field(n).end) for n in lay.names())
    assert covered[0][0] == 0 and covered[-1][1] == 96
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))


def _write_rules(device: str) -> ConfigWriteRules:
    sec = sections.NET_CONFIG
    return ConfigWriteRules(*(Rule(f"{device}.config.driver_write.{what}", Level.MUST, sec, what)
                              for what in ("unmapped", "read_only", "partial")))


def test_overlapping_layout_is_refused() -> None:
    sec = sections.NET_CONFIG
    with pytest.raises(ConfigAccessError, match="overlaps"):
        build_layout("x", 8, sec, (ConfigField("a", 0, 4, sec), ConfigField("b", 2, 4, sec)),
                     write_rules=_write_rules("x"))
    with pytest.raises(ConfigAccessError, match="past size"):
        build_layout("x", 4, sec, (ConfigField("a", 0, 8, sec),), write_rules=_write_rules("x"))


def test_layout_rules_are_named_for_their_device() -> None:
    sec = sections.NET_CONFIG
    with pytest.raises(ConfigAccessError, match=r"not a x\.config rule"):
        build_layout("x", 4, sec, (ConfigField("a", 0, 4, sec),), write_rules=_write_rules("y"))
    assert build_layout("x", 4, sec, (), write_rules=_write_rules("x")).rules == tuple(_write_rules("x"))
    rule = Rule("x.config.a.write", Level.MUST, sec, "a is writable")
    with pytest.raises(ConfigAccessError, match="writable"):
        ConfigField("a", 0, 4, sec, writable_if=3)
    with pytest.raises(ConfigAccessError, match="writable"):
        ConfigField("a", 0, 4, sec, write_rule=rule)
    with pytest.raises(ConfigAccessError, match="allowed_writes"):
        ConfigField("a", 0, 4, sec, allowed_writes=frozenset({0}))
    assert ConfigField("a", 0, 4, sec, writable_if=3, write_rule=rule).rules == (rule,)
    assert [r.rule for r in BLK_CONFIG_LAYOUT.rules] == [
        "blk.config.driver_write.unmapped", "blk.config.driver_write.read_only",
        "blk.config.writeback.read_before_features_ok", "blk.config.writeback.value", "blk.config.writeback.write"]
    assert [r.rule for r in NET_CONFIG_LAYOUT.rules] == ["net.config.driver_write.unmapped",
                                                         "net.config.driver_write.read_only"]
    assert [r.level for r in NET_CONFIG_LAYOUT.rules] == [Level.MUST] * 2
    unwritable = ConfigWriteRules(*tuple(_write_rules("x"))[:2])
    with pytest.raises(ConfigAccessError, match="partial"):
        build_layout("x", 4, sec, (ConfigField("a", 0, 4, sec, writable_if=0, write_rule=rule),),
                     write_rules=unwritable)
    assert build_layout("x", 4, sec, (ConfigField("a", 0, 1, sec, writable_if=0, write_rule=rule),),
                        write_rules=unwritable).rules == (*unwritable, rule)


def test_partial_and_unmapped_writes_name_their_rules() -> None:
    sec = sections.NET_CONFIG
    rule = Rule("x.config.a.write", Level.MUST, sec, "a is writable")
    lay = build_layout("x", 8, sec, (ConfigField("a", 0, 2, sec, writable_if=0, write_rule=rule),),
                       write_rules=_write_rules("x"))
    raw = bytes(8)
    assert lay.write(raw, 0, b"\x01\x02", negotiated=1).rule == "x.config.a.write"
    half = lay.write(raw, 1, b"\x01", negotiated=1)
    assert not half.accepted and half.rule == "x.config.driver_write.partial" and half.config_after == raw
    gap = lay.write(raw, 4, b"\x01", negotiated=1)
    assert not gap.accepted and gap.rule == "x.config.driver_write.unmapped"


# -- rendering --------------------------------------------------------------------------------
def test_net_config_renders_little_endian() -> None:
    state = NetDeviceState(permanent_mac=bytes.fromhex("020000aabbcc"), max_virtqueue_pairs=4, mtu=9000,
                           speed=10000, duplex=1)
    raw = state.render_config(NET_ALL)
    assert len(raw) == 24
    assert raw[0:6] == bytes.fromhex("020000aabbcc")
    assert struct.unpack_from("<HHHIB", raw, 6) == (vn.VIRTIO_NET_S_LINK_UP, 4, 9000, 10000, 1)
    assert raw[17:] == bytes(7)  # RSS fields: RSS / HASH_REPORT not offered
    assert NET_CONFIG_LAYOUT.decode(raw)["mtu"] == 9000


def test_net_config_leaves_absent_fields_zero() -> None:
    state = NetDeviceState(permanent_mac=b"\x02" * 6, max_virtqueue_pairs=4, mtu=1500)
    raw = state.render_config(bit(vn.VIRTIO_NET_F_MAC))
    assert raw[:6] == b"\x02" * 6 and raw[6:] == bytes(18)


def test_blk_config_renders_every_field() -> None:
    cfg = BlkConfig(capacity=0x40000, size_max=0x1000, seg_max=32, blk_size=4096, num_queues=2, writeback=1,
                    geometry=(1024, 16, 63), topology=(3, 1, 8, 64), max_discard_sectors=0x2000,
                    max_discard_seg=4, discard_sector_alignment=8, max_write_zeroes_sectors=0x3000,
                    max_write_zeroes_seg=2, write_zeroes_may_unmap=1)
    raw = cfg.render()
    assert len(raw) == 96
    assert struct.unpack_from("<QII", raw, 0) == (0x40000, 0x1000, 32)
    assert struct.unpack_from("<HBBI", raw, 16) == (1024, 16, 63, 4096)
    assert struct.unpack_from("<BBHI", raw, 24) == (3, 1, 8, 64)
    assert struct.unpack_from("<BBH", raw, 32) == (1, 0, 2)
    assert struct.unpack_from("<IIIIIB", raw, 36) == (0x2000, 4, 8, 0x3000, 2, 1)
    assert raw[57:] == bytes(39)  # unused1, secure erase and zoned: all zero


def test_blk_config_with_offer_zeroes_fields_of_features_not_offered() -> None:
    cfg = BlkConfig(capacity=8, size_max=0x1000, seg_max=32, num_queues=4)
    raw = cfg.render(offered=bit(vb.VIRTIO_BLK_F_SEG_MAX))
    assert struct.unpack_from("<QIIH", raw, 0)[:3] == (8, 0, 32)
    assert struct.unpack_from("<H", raw, 34) == (0,)


def test_render_refuses_bad_values() -> None:
    with pytest.raises(ConfigAccessError, match="does not fit"):
        NET_CONFIG_LAYOUT.render({"mtu": 1 << 16})
    with pytest.raises(ConfigAccessError, match="exactly 6 bytes"):
        NET_CONFIG_LAYOUT.render({"mac": b"\x00" * 5})
    with pytest.raises(ConfigAccessError, match="no field"):
        NET_CONFIG_LAYOUT.render({"nope": 1})
    with pytest.raises(ConfigAccessError, match="padding"):
        BLK_CONFIG_LAYOUT.render({"unused0": 1})
    with pytest.raises(ConfigAccessError, match="does not exist"):
        NET_CONFIG_LAYOUT.render({"mtu": 1500}, offered=0)


@settings(max_examples=60)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1))
def test_blk_render_decode_round_trip(capacity: int, seg_max: int, queues: int) -> None:
    raw = BlkConfig(capacity=capacity, seg_max=seg_max, num_queues=queues).render()
    back = BLK_CONFIG_LAYOUT.decode(raw)
    assert (back["capacity"], back["seg_max"], back["num_queues"]) == (capacity, seg_max, queues)


# -- presence -----------------------------------------------------------------------------------
def test_presence_distinguishes_absent_offered_negotiated() -> None:
    mq = bit(vn.VIRTIO_NET_F_MQ)
    rss = bit(vn.VIRTIO_NET_F_RSS)
    assert NET_CONFIG_LAYOUT.presence("max_virtqueue_pairs", 0) is Presence.ABSENT
    assert NET_CONFIG_LAYOUT.presence("max_virtqueue_pairs", mq) is Presence.OFFERED
    assert NET_CONFIG_LAYOUT.presence("max_virtqueue_pairs", mq, 0) is Presence.OFFERED
    assert NET_CONFIG_LAYOUT.presence("max_virtqueue_pairs", mq, mq) is Presence.NEGOTIATED
    assert NET_CONFIG_LAYOUT.presence("max_virtqueue_pairs", rss, rss) is Presence.NEGOTIATED
    # mac always exists, but is only valid once VIRTIO_NET_F_MAC is negotiated (§5.1.4).
    assert NET_CONFIG_LAYOUT.presence("mac", 0) is Presence.OFFERED
    assert NET_CONFIG_LAYOUT.presence("mac", 0, 0) is Presence.OFFERED
    mac = bit(vn.VIRTIO_NET_F_MAC)
    assert NET_CONFIG_LAYOUT.presence("mac", mac, mac) is Presence.NEGOTIATED
    assert BLK_CONFIG_LAYOUT.presence("capacity", 0, 0) is Presence.NEGOTIATED


# -- reads ----------------------------------------------------------------------------------------
def test_read_of_offered_field_before_negotiation_is_defined() -> None:
    state = NetDeviceState(max_virtqueue_pairs=8)
    offered = bit(vn.VIRTIO_NET_F_MQ, vn.VIRTIO_NET_F_CTRL_VQ)
    raw = state.render_config(offered)
    got = NET_CONFIG_LAYOUT.read(raw, 8, 2, offered=offered)  # before FEATURES_OK: no negotiated set
    assert got.data == (8).to_bytes(2, "little")
    assert got.fully_defined and not got.violations and got.fields == ("max_virtqueue_pairs",)


def test_read_of_absent_field_breaks_driver_rule() -> None:
    raw = NetDeviceState().render_config(0)
    got = NET_CONFIG_LAYOUT.read(raw, 10, 2, offered=0)
    assert got.data == b"\0\0"
    assert got.undefined_fields == ("mtu",) and not got.fully_defined
    [v] = got.violations
    assert v.level is Level.MUST and v.citation == sections.CONFIG_SPACE_DRIVER
    assert v.rule == READ_ABSENT_FIELD.rule == "config.driver.read_absent_field" and "mtu" in v.message


def test_read_outside_config_is_refused() -> None:
    raw = NetDeviceState().render_config(NET_ALL)
    with pytest.raises(ConfigAccessError, match="outside"):
        NET_CONFIG_LAYOUT.read(raw, 20, 8, offered=NET_ALL)
    with pytest.raises(ConfigAccessError):
        NET_CONFIG_LAYOUT.read(raw, -1, 1, offered=NET_ALL)
    assert NET_CONFIG_LAYOUT.read(raw, 24, 0, offered=NET_ALL).data == b""


def test_blk_writeback_read_before_features_ok_is_flagged() -> None:
    wce = bit(vb.VIRTIO_BLK_F_CONFIG_WCE, vb.VIRTIO_BLK_F_FLUSH)
    raw = BlkConfig(capacity=8, writeback=1).render()
    early = BLK_CONFIG_LAYOUT.read(raw, 32, 1, offered=wce, features_ok=False)
    assert early.data == b"\x01"
    assert [v.rule for v in early.violations] == ["blk.config.writeback.read_before_features_ok"]
    assert not BLK_CONFIG_LAYOUT.read(raw, 32, 1, offered=wce, negotiated=wce).violations


# -- writes --------------------------------------------------------------------------------------
def test_net_has_no_writable_field() -> None:
    raw = NetDeviceState(permanent_mac=b"\x02" * 6).render_config(NET_ALL)
    for name in NET_CONFIG_LAYOUT.names():
        f = NET_CONFIG_LAYOUT.field(name)
        res = NET_CONFIG_LAYOUT.write(raw, f.offset, bytes(f.size), negotiated=NET_ALL)
        assert not res.accepted and res.config_after == raw
        assert res.violations[0].level is Level.MUST
        assert res.citation.number == "5.1.4.2"  # type: ignore[union-attr]


def test_blk_writeback_writable_only_with_config_wce() -> None:
    raw = BlkConfig(capacity=8, writeback=0).render()
    wce = bit(vb.VIRTIO_BLK_F_CONFIG_WCE, vb.VIRTIO_BLK_F_FLUSH)
    ok = BLK_CONFIG_LAYOUT.write(raw, 32, b"\x01", negotiated=wce)
    assert ok.accepted and ok.config_after[32] == 1 and ok.config_after[:32] == raw[:32]
    assert ok.rule == "blk.config.writeback.write"
    refused = BLK_CONFIG_LAYOUT.write(raw, 32, b"\x01", negotiated=bit(vb.VIRTIO_BLK_F_FLUSH))
    assert not refused.accepted and refused.config_after == raw
    assert refused.rule == "blk.config.driver_write.read_only" and "writeback" in refused.violations[0].message


def test_blk_writeback_rejects_undefined_value_and_neighbours() -> None:
    raw = BlkConfig(capacity=8).render()
    wce = bit(vb.VIRTIO_BLK_F_CONFIG_WCE)
    bad = BLK_CONFIG_LAYOUT.write(raw, 32, b"\x02", negotiated=wce)
    assert not bad.accepted and bad.violations[0].rule == "blk.config.writeback.value"
    spill = BLK_CONFIG_LAYOUT.write(raw, 32, b"\x01\x00", negotiated=wce)  # also hits unused0
    assert not spill.accepted and spill.config_after == raw
    assert [v.rule for v in spill.violations] == ["blk.config.driver_write.read_only"]  # unused0
    cap = BLK_CONFIG_LAYOUT.write(raw, 0, bytes(8), negotiated=wce)
    assert not cap.accepted and cap.violations[0].level is Level.SHOULD


@settings(max_examples=80)
@given(st.integers(0, 95), st.binary(min_size=1, max_size=8), st.integers(0, 2**15 - 1))
def test_any_refused_write_leaves_config_unchanged(offset: int, data: bytes, negotiated: int) -> None:
    raw = BlkConfig(capacity=123, seg_max=7).render()
    data = data[:96 - offset]
    res = BLK_CONFIG_LAYOUT.write(raw, offset, data, negotiated=negotiated)
    if res.accepted:
        assert (offset, len(data)) == (32, 1) and data[0] in (0, 1)
        assert negotiated >> vb.VIRTIO_BLK_F_CONFIG_WCE & 1
    else:
        assert res.config_after == raw and res.violations
