"""Only the simulator's sources are taken from linux-source, and the out-of-tree build is asked for right."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from vdpacert.kernel.build import MODULES, extract_sources, kbuild_file, make_command, missing_headers
from vdpacert.kernel.errors import PrepareError

TOP = "linux-source-6.12"


def test_kbuild_builds_the_four_modules_in_one_directory() -> None:
    lines = [line for line in kbuild_file().splitlines() if not line.startswith("#")]
    assert lines == [f"obj-m += {name}.o" for name in MODULES]
    assert MODULES == ("vringh", "vdpa_sim", "vdpa_sim_net", "vdpa_sim_blk")


def test_make_is_an_out_of_tree_build_without_btf() -> None:
    command = make_command(Path("/c/root/usr/src/linux-headers-R"), Path("/c/R/modules"), jobs=2)
    assert command[:3] == ["make", "-C", "/c/root/usr/src/linux-headers-R"]
    assert "M=/c/R/modules" in command and "-j2" in command and command[-1] == "modules"
    assert "CONFIG_DEBUG_INFO_BTF_MODULES=" in command, "no pahole needed on the host"


def source_tarball(members: dict[str, str]) -> bytes:
    """A linux-source-like tar.xz: members in the order given (the real one lists drivers/ before include/)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def source_deb(tmp_path: Path, members: dict[str, str]) -> Path:
    """A .deb shaped like linux-source-6.12's, built with the real dpkg-deb."""
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: linux-source-6.12\nVersion: 6.12.117-1\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    (tree / "usr" / "src").mkdir(parents=True)
    (tree / "usr" / "src" / f"{TOP}.tar.xz").write_bytes(source_tarball(members))
    deb = tmp_path / "linux-source-6.12_6.12.117-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


SIMULATOR = {
    "drivers/vdpa/vdpa_sim/Makefile": "obj-$(CONFIG_VDPA_SIM) += vdpa_sim.o\n",
    "drivers/vdpa/vdpa_sim/vdpa_sim.c": '#include <linux/vringh.h>\n#include "vdpa_sim.h"\n',
    "drivers/vdpa/vdpa_sim/vdpa_sim.h": "#include <linux/vdpa.h>\n",
    "drivers/vdpa/vdpa_sim/vdpa_sim_net.c": "#include <uapi/linux/virtio_net.h>\n",
    "drivers/vdpa/vdpa_sim/vdpa_sim_blk.c": "#include <linux/blkdev.h>\n",
    "drivers/vdpa/vdpa_sim/sub/skip.c": "not ours\n",
    "drivers/vdpa/vdpa_user/vduse_dev.c": "not ours\n",
    "drivers/vhost/vhost.c": "not ours\n",
    "drivers/vhost/vringh.c": "#include <linux/vringh.h>\n#include <linux/vhost_iotlb.h>\n",
}


def headers_tree(tmp_path: Path, present: list[str]) -> list[Path]:
    include = tmp_path / "headers" / "include"
    for name in present:
        (include / name).parent.mkdir(parents=True, exist_ok=True)
        (include / name).write_text("")
    return [include]


def test_only_the_simulator_and_vringh_are_taken(tmp_path: Path) -> None:
    include = headers_tree(tmp_path, ["linux/vringh.h", "linux/vhost_iotlb.h", "linux/vdpa.h",
                                      "uapi/linux/virtio_net.h", "linux/blkdev.h"])
    members = {**SIMULATOR, "include/linux/vringh.h": "from the tarball\n", "kernel/sched/core.c": "x\n"}
    taken = extract_sources(source_deb(tmp_path, members), tmp_path / "modules", include)
    assert sorted(taken) == sorted(name for name in SIMULATOR if "vdpa_sim/sub" not in name
                                   and ("vdpa_sim/" in name or name.endswith("vringh.c")))
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == [
        "Makefile", "vdpa_sim.c", "vdpa_sim.h", "vdpa_sim_blk.c", "vdpa_sim_net.c", "vringh.c"]
    assert not [p for p in tmp_path.glob("linux-source-*") if p.is_dir()], "the unpacked tarball is cleaned up"


def test_a_header_the_headers_package_lacks_comes_from_the_tarball(tmp_path: Path) -> None:
    include = headers_tree(tmp_path, ["linux/vringh.h", "linux/vdpa.h", "uapi/linux/virtio_net.h",
                                      "linux/blkdev.h"])  # no linux/vhost_iotlb.h
    members = {**SIMULATOR, "include/linux/vhost_iotlb.h": "/* iotlb */\n", "include/linux/zzz.h": ""}
    taken = extract_sources(source_deb(tmp_path, members), tmp_path / "modules", include)
    assert "include/linux/vhost_iotlb.h" in taken and "include/linux/zzz.h" not in taken
    assert (tmp_path / "modules" / "include" / "linux" / "vhost_iotlb.h").read_text() == "/* iotlb */\n"


def test_a_header_found_nowhere_is_named(tmp_path: Path) -> None:
    include = headers_tree(tmp_path, ["linux/vringh.h", "linux/vdpa.h", "uapi/linux/virtio_net.h"])
    with pytest.raises(PrepareError, match=r"linux/blkdev\.h, linux/vhost_iotlb\.h"):
        extract_sources(source_deb(tmp_path, SIMULATOR), tmp_path / "modules", include)


def test_a_tarball_without_the_simulator_is_an_error(tmp_path: Path) -> None:
    members = {"drivers/vhost/vringh.c": "x\n"}
    with pytest.raises(PrepareError, match=r"lacks drivers/vhost/vringh\.c or drivers/vdpa/vdpa_sim/"):
        extract_sources(source_deb(tmp_path, members), tmp_path / "modules", [])


def test_missing_headers_ignores_local_includes(tmp_path: Path) -> None:
    source = tmp_path / "a.c"
    source.write_text('#include "local.h"\n# include <linux/a.h>\n#include <linux/b.h>\n')
    assert missing_headers([source], headers_tree(tmp_path, ["linux/a.h"])) == {"linux/b.h"}
