"""Target strings, the targets they open, and what a Target hands the suite.

The vhost-vdpa char-device target cannot be opened here (no vDPA kernel), so its channel is
exercised on the character devices every Linux has: /dev/null answers ENOTTY to every vhost
ioctl, which is enough to see the real fcntl path, the error mapping and the kick bookkeeping.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import vendor_parent

from vdpacert.conformance.client import TargetDied, VhostClient
from vdpacert.conformance.targets import Target, TargetSpec, make_target, parse_target
from vdpacert.conformance.targets.vhost_vdpa_dev import DevChannel
from vdpacert.uapi import vhost as V  # noqa: N812

VENDOR = vendor_parent.__name__  # importable under the name pytest gave it


@pytest.fixture
def net() -> Iterator[Target]:
    with make_target("sim-net") as target:
        yield target


# ----- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "spec", "canonical"), [
    ("sim-net", TargetSpec("sim-net"), "sim-net"),
    ("sim-blk", TargetSpec("sim-blk"), "sim-blk"),
    ("sim-net:mq=4,mtu=9000", TargetSpec("sim-net", {"max_vq_pairs": 4, "mtu": 9000}),
     "sim-net:max_vq_pairs=4,mtu=9000"),
    (" sim-net:mac=02:AA:00:00:00:01, queue_size=0x40 ,features=130000064",
     TargetSpec("sim-net", {"mac": "02:aa:00:00:00:01", "queue_size": 64, "features": 0x130000064}),
     "sim-net:features=0x130000064,mac=02:aa:00:00:00:01,queue_size=64"),
    ("sim-blk:capacity=2048,num_queues=2,features=0x300000244",
     TargetSpec("sim-blk", {"capacity": 2048, "num_queues": 2, "features": 0x300000244}),
     "sim-blk:capacity=2048,features=0x300000244,num_queues=2"),
    ("python:acme.vdpa:make_parent", TargetSpec("python", module="acme.vdpa", factory="make_parent"),
     "python:acme.vdpa:make_parent"),
    ("python:acme:Card.create:queues=4,name=left,mask=0x10",
     TargetSpec("python", {"queues": 4, "name": "left", "mask": 16}, module="acme", factory="Card.create"),
     "python:acme:Card.create:mask=16,name=left,queues=4"),
    ("vhost-vdpa:/dev/vhost-vdpa-0", TargetSpec("vhost-vdpa", path="/dev/vhost-vdpa-0"),
     "vhost-vdpa:/dev/vhost-vdpa-0"),
])
def test_good_target_strings(text: str, spec: TargetSpec, canonical: str) -> None:
    assert parse_target(text) == spec
    assert str(spec) == canonical
    assert parse_target(canonical) == spec


@pytest.mark.parametrize(("text", "complaint"), [
    ("", "empty target"),
    ("sim-foo", "unknown kind 'sim-foo'"),
    ("vhost-user:/tmp/sock", "unknown kind 'vhost-user'"),
    ("sim-net:mq", "'mq' is not key=value"),
    ("sim-net:mq=", "'mq=' is not key=value"),
    ("sim-net:mq=2,", "'' is not key=value"),
    ("sim-net:mq=x", "max_vq_pairs='x' is not a number"),
    ("sim-net:mq=2,max_vq_pairs=3", "repeats an attribute"),
    ("sim-net:mtu=1500,mtu=9000", "'mtu' is given twice"),
    ("sim-net:mtu=10", r"mtu=10 is outside \[68, 65535\]"),
    ("sim-net:queue_size=100", "not a power of two"),
    ("sim-net:mac=01:00:00:00:00:01", "multicast"),
    ("sim-net:mac=02-00-00-00-00-01", "is not like"),
    ("sim-net:features=0xzz", "not a hex bit mask"),
    ("sim-net:capacity=8", "sim-net has no attribute 'capacity'; it takes batch_mapping, features, mac"),
    ("sim-blk:mtu=9000", "sim-blk has no attribute 'mtu'; it takes batch_mapping, capacity, disk, features, "
                         "max_iotlb_entries, num_queues, queue_size"),
    ("sim-blk:mq=2", "sim-blk has no attribute 'mq'"),
    ("python:acme", "'' is not a factory name"),
    ("python::make", "'' is not a module name"),
    ("python:acme-vdpa:make", "'acme-vdpa' is not a module name"),
    ("python:acme:1make", "'1make' is not a factory name"),
    ("python:acme:make:1x=2", "'1x' is not a keyword argument name"),
    ("python:acme:make:queues", "'queues' is not key=value"),
    ("vhost-vdpa:", "absolute path"),
    ("vhost-vdpa:dev/vhost-vdpa-0", "absolute path"),
])
def test_bad_target_strings_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_target(text)


# ----- embedded targets -------------------------------------------------------------------------------

def test_attributes_reach_the_device() -> None:
    with make_target("sim-net:mq=2,mtu=9000") as target:
        assert (target.name, target.kind, target.device_id) == ("sim-net:max_vq_pairs=2,mtu=9000", "sim-net", 1)
        client = target.client
        assert client.get_vqs_count() == 5
        assert client.get_features() >> 22 & 1  # VIRTIO_NET_F_MQ
        assert struct.unpack("<HH", client.get_config(8, 4)) == (2, 9000)  # max_virtqueue_pairs, mtu
    with make_target("sim-net:mac=02:AA:00:00:00:01") as target:
        assert target.client.get_config(0, 6) == bytes.fromhex("02aa00000001")
    with make_target("sim-blk:capacity=2048,num_queues=2,queue_size=64") as target:
        client = target.client
        assert (target.device_id, client.get_vqs_count(), client.get_vring_num()) == (2, 2, 64)
        assert struct.unpack("<Q", client.get_config(0, 8)) == (2048,)


def test_attributes_the_device_refuses_are_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"sim-net refused the attributes: .*VIRTIO_NET_F_MQ"):
        make_target("sim-net:mq=2,features=100000000")
    with pytest.raises(ValueError, match="sim-net refused"):
        make_target("sim-net:features=400000")  # MQ offered without CTRL_VQ


def test_two_targets_of_one_kind_do_not_interfere() -> None:
    with make_target("sim-net") as first, make_target("sim-net") as second:
        first.client.set_owner()
        second.client.set_owner()  # not EBUSY: a device of its own
        first.client.set_status(0x03)
        assert (first.client.get_status(), second.client.get_status()) == (0x03, 0)
        assert first.client.get_config(0, 6) == second.client.get_config(0, 6)  # same name, same MAC
        first.reopen()
        assert second.client.get_status() == 0 and second.client.get_device_id() == 1
        first.close()
        second.client.set_status(0x01)
        assert second.client.get_status() == 0x01


def test_reopen_is_a_fresh_open_of_a_fresh_device(net: Target) -> None:
    client = net.client
    client.set_owner()
    client.set_status(0x03)
    client.set_features(1 << 32 | 1 << 33)
    client.set_status(0x0B)
    net.reopen()
    assert net.client is not client
    with pytest.raises(TargetDied):
        client.get_status()
    assert net.client.get_status() == 0
    net.client.set_owner()  # the old owner left with the old file
    net.client.set_status(0x03)
    net.client.set_features(1 << 32)  # features may be negotiated again


def test_eventfds_and_memory_belong_to_the_open(net: Target) -> None:
    fd = net.eventfd()
    assert not os.get_blocking(fd)
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    memory = net.new_memory(0x4000, gpa=0x8000)
    assert (memory.size, memory.gpa) == (0x4000, 0x8000)
    net.client.set_owner()
    net.client.iotlb_update(0x1000, 0x4000, memory.uaddr, 3)  # the device reaches it by user address
    net.reopen()
    assert memory.is_closed
    with pytest.raises(OSError):
        os.fstat(fd)
    fd = net.eventfd()
    net.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    net.close()  # idempotent


def test_wait_call_never_outlives_its_timeout(net: Target) -> None:
    fd = net.eventfd()
    started = time.monotonic()
    assert not net.wait_call(fd, 0.05)
    assert 0.04 <= time.monotonic() - started < 1.0
    os.eventfd_write(fd, 3)
    assert net.wait_call(fd, 5.0)
    assert not net.wait_call(fd, 0)  # read back to 0


# ----- python:MODULE:FACTORY --------------------------------------------------------------------------

def test_a_vendor_parent_behind_the_reference_front() -> None:
    with make_target(f"python:{VENDOR}:make_parent:num_max=128") as target:
        assert (target.kind, target.name) == ("python", f"python:{VENDOR}:make_parent:num_max=128")
        parent = vendor_parent.made[-1]
        client = target.client
        assert (target.device_id, client.get_vring_num(), client.get_vqs_count()) == (42, 128, 2)
        assert client.get_config(0, 4) == vendor_parent.CONFIG[:4]
        client.set_owner()
        memory = target.new_memory(0x1000)
        client.iotlb_update(0x2000, 0x1000, memory.uaddr, 3)
        assert parent.maps[0].entries() == [(0x2000, 0x2fff, memory.uaddr, 3)]
        client.set_status(0x03)
        target.reopen()
        assert vendor_parent.made[-1] is not parent  # a new instance per open
        assert target.client.get_status() == 0 and target.client.get_vring_num() == 128


def test_two_vendor_targets_get_their_own_parents() -> None:
    with make_target(f"python:{VENDOR}:make_parent") as first, make_target(f"python:{VENDOR}:make_parent") as second:
        first.client.set_owner()
        second.client.set_owner()
        first.client.set_status(0x01)
        assert second.client.get_status() == 0


@pytest.mark.parametrize(("text", "complaint"), [
    ("python:vdpacert_no_such_module:make", "cannot import module 'vdpacert_no_such_module'"),
    (f"python:{VENDOR}:no_such_factory", "has no 'no_such_factory'"),
    (f"python:{VENDOR}:NOT_A_FACTORY", "is a int, not a factory"),
    (f"python:{VENDOR}:make_nothing", "got a object, not a VdpaParent"),
    (f"python:{VENDOR}:make_parent:bogus=1", "the factory refused"),
])
def test_bad_vendor_factories_are_value_errors(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        make_target(text)


# ----- vhost-vdpa:/dev/... ----------------------------------------------------------------------------

def test_a_missing_device_node_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="no such device node; load vhost_vdpa") as caught:
        make_target("vhost-vdpa:/dev/vhost-vdpa-vdpacert-missing")
    assert caught.value.filename == "/dev/vhost-vdpa-vdpacert-missing"


def test_a_node_that_is_not_a_vhost_vdpa_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a vhost-vdpa device") as caught:
        make_target("vhost-vdpa:/dev/null")
    assert caught.value.errno == errno.ENOTTY
    regular = tmp_path / "vhost-vdpa-0"
    regular.write_bytes(b"")
    with pytest.raises(OSError, match="not a character device") as caught:
        make_target(f"vhost-vdpa:{regular}")
    assert caught.value.errno == errno.ENODEV


def test_the_char_device_channel_uses_real_system_calls() -> None:
    client = VhostClient(DevChannel("/dev/null"))
    try:
        with pytest.raises(OSError) as caught:
            client.get_features()  # a real fcntl.ioctl: /dev/null answers ENOTTY
        assert caught.value.errno == errno.ENOTTY and not isinstance(caught.value, TargetDied)
        with pytest.raises(OSError) as caught:
            client.ioctl(V.VHOST_GET_VRING_BASE, b"")  # a short argument is padded, never overrun
        assert caught.value.errno == errno.ENOTTY
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            with pytest.raises(OSError):
                client.set_vring_kick(0, kick)
        finally:
            os.close(kick)
        with pytest.raises(OSError, match="no kick eventfd") as caught:
            client.kick(0)  # the refused SET_VRING_KICK left no eventfd to write
        assert caught.value.errno == errno.ENXIO
        assert client.read_fault() is None  # /dev/null reads as end of file: no message
        assert client.write(bytes(72)) == 72
    finally:
        client.close()
    with pytest.raises(TargetDied):
        client.get_features()


def test_a_second_open_of_a_held_device_is_refused_with_ebusy() -> None:
    """vhost_vdpa_open's exclusivity, as the lockstep checks it (vhost_vdpa.open.exclusive)."""
    from vdpacert.conformance.lockstep import Lockstep

    with make_target("sim-blk") as target:
        with pytest.raises(OSError) as refused:
            target.open_again()
        assert refused.value.errno == errno.EBUSY
        ls = Lockstep(target)
        ls.close_and_reopen()
        assert ls.exercised["vhost_vdpa.open.exclusive"] == 1 and ls.exercised["vhost_vdpa.fd.closed"] == 1
    with pytest.raises(OSError) as closed:
        target.open_again()
    assert closed.value.errno == errno.EBADF
