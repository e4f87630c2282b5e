"""The initramfs holds busybox, the modules in load order and an init that does its steps in a safe order."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from vdpacert.kernel.guest import GuestCommand, VdpaDevice
from vdpacert.kernel.initramfs import (
    GUEST_MODULES,
    HOST_TAG,
    base_archive,
    init_script,
    recipe,
    run_archive,
    write_initrd,
)


def entries(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, body) of a newc stream of one or more archives (the kernel reads them in turn)."""
    out: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while offset < len(data):
        fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[offset + 110: offset + 110 + namesize - 1].decode()
        body = offset + 110 + namesize + (-(110 + namesize) % 4)
        if name != "TRAILER!!!":
            out[name] = (fields[1], data[body: body + filesize])
        offset = body + filesize + (-filesize % 4)
    return out


def test_init_is_valid_posix_shell() -> None:
    subprocess.run(["sh", "-n", "-c", init_script()], check=True)


def test_init_orders_its_steps_so_each_finds_what_it_needs() -> None:
    script = init_script()

    def at(text: str) -> int:
        assert text in script, text
        return script.index(text)

    assert at("mount -t devtmpfs") < at("insmod") < at("mount -t 9p -o ") < at("mount -t overlay")
    assert at("mount -t overlay") < at("mount -o rbind /dev /host/dev") < at("vdpacert_add_devices\n")
    assert at("vdpacert_add_devices\n") < at("report started") < at("vdpacert_command\n") < at('report "exit:$?"')
    assert at('report "exit:$?"') < script.rindex("poweroff -f"), "the status is out before the power goes"
    assert f",ro,msize=524288,cache=loose {HOST_TAG} /host" in script, "the host root is mounted read-only"
    assert "lowerdir=/host/tmp" in script, "/tmp stays the host's, made writable by an overlay"


def test_base_archive_has_busybox_init_console_and_modules_in_order() -> None:
    modules = [("vhost_iotlb", b"m1"), ("vdpa", b"m2"), ("vhost_vdpa", b"m3")]
    files = entries(base_archive(b"\x7fELF busybox", modules))
    mode, body = files["init"]
    assert body.decode() == init_script() and mode & 0o111
    assert files["bin/busybox"][1] == b"\x7fELF busybox"
    assert stat.S_ISCHR(files["dev/console"][0]), "the kernel opens /dev/console before /init runs"
    assert files["vdpacert/modules"][1] == b"vhost_iotlb\nvdpa\nvhost_vdpa\n"
    assert files["lib/modules/vdpa.ko"][1] == b"m2"
    for mountpoint in ("proc", "sys", "dev", "host", "overlay"):
        assert stat.S_ISDIR(files[mountpoint][0])


def test_a_run_appends_only_its_conf(tmp_path: Path) -> None:
    base = tmp_path / "initramfs.cpio"
    base.write_bytes(base_archive(b"bb", [("vdpa", b"m")]))
    command = GuestCommand(argv=("uname", "-r"), cwd="/", env={"PATH": "/bin"},
                           devices=(VdpaDevice.parse("vdpa0:vdpasim_net"),))
    initrd = write_initrd(base, command, tmp_path / "initrd")
    assert initrd.read_bytes().startswith(base.read_bytes())
    assert len(base.read_bytes()) % 4 == 0, "the second archive starts 4-byte aligned"
    files = entries(initrd.read_bytes())
    conf = files["vdpacert/run.conf"][1].decode()
    assert f"VDPACERT_NONCE={command.nonce}" in conf and "vdpasim_net" in conf
    assert set(entries(run_archive(command))) == {"vdpacert", "vdpacert/run.conf"}


def test_the_guest_loads_vhost_vdpa_both_simulators_9p_and_overlay() -> None:
    assert set(GUEST_MODULES) == {"vhost_vdpa", "vdpa_sim_net", "vdpa_sim_blk", "9pnet_virtio", "9p", "overlay"}
    assert recipe() == recipe() and len(recipe()) == 16
