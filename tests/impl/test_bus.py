"""The vdpa bus (mgmtdev show, dev add/del/show, open as vhost-vdpa or virtio) and its CLI."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from vdpacert import cli
from vdpacert.impl.bus import ATTRIBUTES, MgmtDev, VdpaBus, default_bus, load_mgmtdevs
from vdpacert.impl.guestmem import MemoryRegistry
from vdpacert.uapi.virtio_config import VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU

NET_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU)


def errno_of(call: Any, *args: Any, **kwargs: Any) -> int:
    with pytest.raises(OSError) as caught:
        call(*args, **kwargs)
    assert caught.value.errno is not None
    return caught.value.errno


@pytest.fixture
def test_net(kinds: Any) -> MgmtDev:
    def factory(name: str, mac: bytes = b"\x52\x54\x00\x00\x00\x01", mtu: int = 1500,
                features: int = NET_FEATURES) -> Any:
        if name == "refused":
            raise ValueError("this name is reserved by the firmware")
        config = bytes(mac) + b"\x00\x00" + b"\x01\x00" + mtu.to_bytes(2, "little")
        return kinds.SetMapParent(offered=features, config=config)

    return MgmtDev(f"test-net-{os.getpid()}", factory, frozenset({"mac", "mtu", "features"}), "net",
                   max_supported_vqs=2, supported_features=NET_FEATURES)


@pytest.fixture
def bus(test_net: MgmtDev) -> VdpaBus:
    made = VdpaBus()
    made.register_mgmtdev(test_net)
    return made


def test_mgmtdev_show_and_registration(bus: VdpaBus, test_net: MgmtDev) -> None:
    (entry,) = bus.mgmtdev_show()
    assert entry == {"name": test_net.name, "supported_classes": ["net"],
                     "supported_attrs": ["features", "mac", "mtu"], "max_supported_vqs": 2,
                     "dev_features": NET_FEATURES}
    assert errno_of(bus.register_mgmtdev, test_net) == errno.EEXIST
    assert errno_of(bus.mgmtdev_show, "nope") == errno.ENODEV
    assert errno_of(bus.unregister_mgmtdev, "nope") == errno.ENODEV
    with pytest.raises(ValueError):
        MgmtDev("x", test_net.factory, frozenset({"colour"}))
    with pytest.raises(ValueError):
        MgmtDev("two words", test_net.factory)


def test_dev_add_show_config_and_del(bus: VdpaBus, test_net: MgmtDev) -> None:
    device = bus.dev_add("vdpa0", test_net.name, mac="52:54:00:aa:bb:cc", mtu="9000")
    assert device.attrs == {"mac": bytes.fromhex("525400aabbcc"), "mtu": 9000}
    assert bus.dev_show() == [{"name": "vdpa0", "type": "network", "mgmtdev": test_net.name,
                               "vendor_id": 0x1AF4, "max_vqs": 2, "max_vq_size": 256}]
    config = bus.dev_config_show("vdpa0")
    assert config["mac"] == "52:54:00:aa:bb:cc" and config["mtu"] == 9000
    assert config["dev_features"] == NET_FEATURES and config["negotiated_features"] == 0
    assert "link" not in config  # STATUS not offered
    assert errno_of(bus.unregister_mgmtdev, test_net.name) == errno.EBUSY
    bus.dev_del("vdpa0")
    assert bus.dev_show() == []
    assert errno_of(bus.dev_del, "vdpa0") == errno.ENODEV
    assert errno_of(bus.dev_show, "vdpa0") == errno.ENODEV
    bus.unregister_mgmtdev(test_net.name)


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"colour": "red"}, errno.EINVAL),
    ({"capacity": 8}, errno.EOPNOTSUPP),  # known attribute, not supported by this mgmtdev
    ({"mac": "52:54:00:aa:bb"}, errno.EINVAL),
    ({"mtu": "67"}, errno.EINVAL),
    ({"mtu": "lots"}, errno.EINVAL),
    ({"mtu": True}, errno.EINVAL),
    ({"features": 1 << 40}, errno.EINVAL),  # not in the mgmtdev's supported features
    ({"features": -1}, errno.EINVAL),
])
def test_dev_add_attribute_errors(bus: VdpaBus, test_net: MgmtDev, attrs: dict[str, Any], expected: int) -> None:
    assert errno_of(bus.dev_add, "vdpa0", test_net.name, **attrs) == expected
    assert bus.dev_show() == []


def test_dev_add_name_and_mgmtdev_errors(bus: VdpaBus, test_net: MgmtDev) -> None:
    assert errno_of(bus.dev_add, "vdpa0", "no-such-mgmtdev") == errno.ENODEV
    for bad in ("", "has space", "x" * 65, "-lead"):
        assert errno_of(bus.dev_add, bad, test_net.name) == errno.EINVAL
    bus.dev_add("vdpa0", test_net.name)
    assert errno_of(bus.dev_add, "vdpa0", test_net.name) == errno.EEXIST
    assert errno_of(bus.dev_add, "refused", test_net.name) == errno.EINVAL  # the factory said no


def test_attribute_parsers() -> None:
    assert ATTRIBUTES["queue_size"]("256") == 256
    assert ATTRIBUTES["features"]("0x100000000") == 1 << 32
    assert ATTRIBUTES["capacity"](2048) == 2048
    for key, bad in (("queue_size", "100"), ("queue_size", "65536"), ("max_vq_pairs", "0"),
                     ("num_queues", "70000"), ("mac", 5)):
        with pytest.raises(ValueError):
            ATTRIBUTES[key](bad)


def test_open_as_vhost_or_virtio_one_at_a_time(bus: VdpaBus, test_net: MgmtDev) -> None:
    bus.dev_add("vdpa0", test_net.name)
    registry = MemoryRegistry()
    with bus.open_vhost("vdpa0", registry) as front:
        assert front.get_device_id() == 1
        assert errno_of(bus.open_vhost, "vdpa0") == errno.EBUSY
        assert errno_of(bus.open_virtio, "vdpa0") == errno.EBUSY
        assert errno_of(bus.dev_del, "vdpa0") == errno.EBUSY
    with bus.open_virtio("vdpa0", registry) as virtio:
        assert virtio.get_features() == NET_FEATURES
    bus.dev_del("vdpa0")
    assert errno_of(bus.open_vhost, "vdpa0") == errno.ENODEV


def test_load_mgmtdevs_registers_what_exists() -> None:
    fresh = VdpaBus()
    names = load_mgmtdevs(fresh)
    assert [entry["name"] for entry in fresh.mgmtdev_show()] == names
    assert load_mgmtdevs(fresh) == []  # idempotent


# ----- CLI ---------------------------------------------------------------------------------------

def run_cli(bus: VdpaBus, *argv: str) -> int:
    args = cli.build_parser().parse_args(list(argv))
    args.bus = bus
    return int(args.handler(args))


def test_cli_mgmtdev_show(bus: VdpaBus, test_net: MgmtDev, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(bus, "mgmtdev", "show") == 0
    out = capsys.readouterr().out
    assert f"{test_net.name}:" in out and "supported_classes net" in out and "max_supported_vqs 2" in out
    assert run_cli(bus, "mgmtdev", "show", "nope") == 2
    assert "ENODEV" in capsys.readouterr().err


def test_cli_dev_add_show_del(bus: VdpaBus, test_net: MgmtDev, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(bus, "dev", "add", "vdpa0", "--mgmtdev", test_net.name, "--attr", "mac=52:54:00:00:00:07",
                   "--attr", "mtu=4000", "--show") == 0
    out = capsys.readouterr().out
    assert f"vdpa0: type network mgmtdev {test_net.name}" in out
    assert "mac 52:54:00:00:00:07" in out and "mtu 4000" in out and "negotiated_features 0x0" in out
    assert run_cli(bus, "dev", "show") == 0
    assert "vdpa0: type network" in capsys.readouterr().out
    assert run_cli(bus, "dev", "add", "vdpa0", "--mgmtdev", test_net.name) == 2
    assert "EEXIST" in capsys.readouterr().err
    assert run_cli(bus, "dev", "add", "vdpa1", "--mgmtdev", test_net.name, "--attr", "mtu") == 2
    assert run_cli(bus, "dev", "add", "vdpa1", "--mgmtdev", test_net.name, "--attr", "capacity=1") == 2
    assert "EOPNOTSUPP" in capsys.readouterr().err
    assert run_cli(bus, "dev", "del", "vdpa0") == 0
    assert run_cli(bus, "dev", "del", "vdpa0") == 2
    assert run_cli(bus, "dev", "show", "--json") == 0
    assert capsys.readouterr().out.strip().endswith("[]")


def test_cli_json(bus: VdpaBus, test_net: MgmtDev, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert run_cli(bus, "dev", "add", "vdpa0", "--mgmtdev", test_net.name, "--show", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dev"]["name"] == "vdpa0" and shown["config"]["mac"] == "52:54:00:00:00:01"


@pytest.fixture
def on_default_bus(test_net: MgmtDev) -> Iterator[MgmtDev]:
    bus = default_bus()
    bus.register_mgmtdev(test_net)
    yield test_net
    for row in bus.dev_show():
        if row["mgmtdev"] == test_net.name:
            bus.dev_del(row["name"])
    bus.unregister_mgmtdev(test_net.name)


def test_cli_main_uses_the_process_bus(on_default_bus: MgmtDev, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"vdpa-{os.getpid()}"
    assert cli.main(["dev", "add", name, "--mgmtdev", on_default_bus.name]) == 0
    captured = capsys.readouterr()
    assert f"{name}: type network" in captured.out
    assert "lives in this process only" in captured.err
    assert cli.main(["dev", "show", name]) == 0
    assert cli.main(["dev", "del", name]) == 0


def test_a_fresh_process_says_devices_do_not_persist() -> None:
    result = subprocess.run([sys.executable, "-m", "vdpacert", "dev", "show"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0
    assert "no vdpa devices in this process" in result.stdout
    assert "lives in this process only" in result.stderr
    result = subprocess.run([sys.executable, "-m", "vdpacert", "dev", "add", "x", "--mgmtdev", "no-such"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "ENODEV" in result.stderr
