"""Module metadata is read from the ELF itself, and modules load after everything they depend on."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from vdpacert.kernel.modinfo import (
    ModuleError,
    builtin_names,
    depends,
    index_tree,
    load_order,
    modinfo,
    module_name,
    read_module,
)


def fake_module(fields: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, laid out as the kernel's modules are."""
    info = b"".join(f"{key}={value}\0".encode() for key, value in fields.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    strtab_off = info_off + len(info)
    shoff = (strtab_off + len(shstrtab) + 7) & ~7
    header = bytearray(64)
    header[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def section(name: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)

    body = bytes(header) + info + shstrtab
    body += bytes(shoff - len(body))
    return body + section(0, 0, 0, 0) + section(1, 1, info_off, len(info)) + section(10, 3, strtab_off,
                                                                                      len(shstrtab))


def test_modinfo_and_depends_come_from_the_section() -> None:
    elf = fake_module({"license": "GPL", "depends": "vringh,vdpa,vhost_iotlb", "name": "vdpa_sim",
                       "alias": "a1"})
    info = modinfo(elf)
    assert info["license"] == ["GPL"] and info["name"] == ["vdpa_sim"]
    assert depends(elf) == ("vringh", "vdpa", "vhost_iotlb")
    assert depends(fake_module({"depends": ""})) == ()
    assert depends(fake_module({"name": "x"})) == ()


def test_not_a_module_is_a_clear_error() -> None:
    with pytest.raises(ModuleError, match="ELF64"):
        modinfo(b"#!/bin/sh\n")


def test_names_fold_dashes_and_drop_suffixes() -> None:
    assert module_name("kernel/net/9p/9pnet_virtio.ko.xz") == "9pnet_virtio"
    assert module_name(Path("vdpa-sim.ko")) == "vdpa_sim"
    assert builtin_names("kernel/drivers/virtio/virtio.ko\nkernel/fs/ext4/ext4.ko\n") == {"virtio", "ext4"}


def test_index_prefers_the_first_root_and_reads_xz(tmp_path: Path) -> None:
    built, image = tmp_path / "built", tmp_path / "image" / "kernel" / "drivers"
    built.mkdir()
    image.mkdir(parents=True)
    (built / "vringh.ko").write_bytes(fake_module({"name": "vringh"}))
    (image / "vringh.ko.xz").write_bytes(lzma.compress(fake_module({"name": "other"})))
    (image / "vhost-iotlb.ko.xz").write_bytes(lzma.compress(fake_module({"name": "vhost_iotlb"})))
    index = index_tree(built, tmp_path / "image")
    assert index["vringh"] == built / "vringh.ko"
    assert modinfo(read_module(index["vhost_iotlb"]))["name"] == ["vhost_iotlb"]


GRAPH = {  # the real dependencies of Debian 6.12's modules the guest loads
    "vhost_vdpa": "vhost,vhost_iotlb,vdpa,irqbypass", "vhost": "vhost_iotlb", "vhost_iotlb": "", "vdpa": "",
    "irqbypass": "", "vringh": "vhost_iotlb", "vdpa_sim": "vringh,vhost_iotlb,vdpa",
    "vdpa_sim_net": "vdpa_sim,vringh,vdpa", "vdpa_sim_blk": "vdpa_sim,vringh,vdpa", "9pnet_virtio": "9pnet",
    "9pnet": "", "9p": "9pnet,netfs", "netfs": "", "overlay": "",
}


def graph_modules(graph: dict[str, str]) -> tuple[dict[str, Path], dict[Path, bytes]]:
    files = {name: Path(f"/m/{name}.ko") for name in graph}
    return files, {files[name]: fake_module({"depends": deps}) for name, deps in graph.items()}


def test_load_order_puts_every_dependency_first() -> None:
    files, elves = graph_modules(GRAPH)
    wanted = ("vhost_vdpa", "vdpa_sim_net", "vdpa_sim_blk", "9pnet_virtio", "9p", "overlay")
    order = load_order(wanted, files, read=elves.__getitem__)
    assert sorted(order) == sorted(GRAPH)
    for name, deps in GRAPH.items():
        for dep in filter(None, deps.split(",")):
            assert order.index(dep) < order.index(name), (dep, name)


def test_builtin_modules_are_skipped_and_missing_ones_named() -> None:
    files, elves = graph_modules(GRAPH)
    assert "netfs" not in load_order(["9p"], files, frozenset({"netfs"}), read=elves.__getitem__)
    del files["vringh"]
    with pytest.raises(ModuleError, match=r"vringh \(needed by vdpa_sim\)"):
        load_order(["vdpa_sim_net"], files, read=elves.__getitem__)


def test_a_dependency_cycle_is_an_error() -> None:
    files, elves = graph_modules({"a": "b", "b": "a"})
    with pytest.raises(ModuleError, match="cycle"):
        load_order(["a"], files, read=elves.__getitem__)
