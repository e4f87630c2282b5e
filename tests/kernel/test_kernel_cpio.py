"""The newc writer produces what the kernel's initramfs unpacker reads: aligned headers, parents first, a trailer."""

from __future__ import annotations

import stat

import pytest

from vdpacert.kernel.cpio import CpioWriter


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, rdev) of every entry up to the trailer, checking the format's alignment rules."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    offset = 0
    while True:
        assert offset % 4 == 0, "every header starts 4-byte aligned"
        assert data[offset:offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = offset + 110
        name = data[name_start: name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            assert (body + filesize) % 4 == 0
            return entries
        entries.append((name, mode, data[body: body + filesize], (rdevmajor, rdevminor)))
        offset = body + filesize + (-filesize % 4)


def test_entries_round_trip_with_modes_parents_and_device_numbers() -> None:
    archive = CpioWriter()
    archive.file("bin/busybox", b"\x7fELF...", mode=0o755)
    archive.file("/init", b"#!/bin/busybox sh\n", mode=0o755)
    archive.device("dev/console", 5, 1)
    archive.symlink("sbin/init", "/init")
    entries = parse_newc(archive.render())
    names = [name for name, *_ in entries]
    assert names == ["bin", "bin/busybox", "init", "dev", "dev/console", "sbin", "sbin/init"]
    by_name = {name: (mode, body, rdev) for name, mode, body, rdev in entries}
    assert stat.S_ISDIR(by_name["bin"][0])
    assert by_name["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF...", (0, 0))
    assert stat.S_ISCHR(by_name["dev/console"][0]) and by_name["dev/console"][2] == (5, 1)
    assert stat.S_ISLNK(by_name["sbin/init"][0]) and by_name["sbin/init"][1] == b"/init"


@pytest.mark.parametrize("size", range(0, 9))
def test_every_body_size_keeps_the_next_header_aligned(size: int) -> None:
    archive = CpioWriter()
    archive.file("a" * (size + 1), b"x" * size)
    archive.file("after", b"ok")
    assert parse_newc(archive.render())[-1][2] == b"ok"


def test_two_archives_concatenate_into_one_stream_the_way_the_kernel_reads_them() -> None:
    first, second = CpioWriter(), CpioWriter()
    first.file("lib/modules/vdpa.ko", b"module")
    second.file("vdpacert/run.conf", b"VDPACERT_NONCE=1\n")
    data = first.render() + second.render()
    tail = data[len(first.render()):]
    assert [name for name, *_ in parse_newc(data)] == ["lib", "lib/modules", "lib/modules/vdpa.ko"]
    assert [name for name, *_ in parse_newc(tail)] == ["vdpacert", "vdpacert/run.conf"]


def test_a_name_climbing_out_of_the_root_is_refused() -> None:
    with pytest.raises(ValueError, match="climbs out"):
        CpioWriter().file("../etc/passwd", b"")


def test_rendering_is_reproducible() -> None:
    def build() -> bytes:
        archive = CpioWriter()
        archive.file("x/y", b"data")
        return archive.render()

    assert build() == build()
