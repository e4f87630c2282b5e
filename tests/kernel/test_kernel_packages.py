"""Picking the kernel version from apt's answers, planning downloads, and fixing the unpacked tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdpacert.kernel.errors import MissingPrerequisite
from vdpacert.kernel.packages import (
    KernelPackages,
    choose,
    compare_versions,
    compilers_in,
    fix_tree,
    newest,
    parse_print_uris,
    stanzas,
)

#: (a, b, what `dpkg --compare-versions` says: -1 a<b, 0 a=b, 1 a>b), recorded from dpkg 1.21.
DPKG_ORDER = [
    ("6.12.117-1~deb12u1", "6.12.115-2~deb12u1", 1),
    ("6.12.117-1~deb12u1", "6.12.117-1", -1),
    ("1.0~rc1", "1.0", -1),
    ("1:1.35.0-4+deb12u1+b1", "1.36.0", 1),
    ("6.12.9-1", "6.12.10-1", -1),
    ("1.0a", "1.0+", -1),
    ("1.0", "1.0-0", 0),
    ("2.0-1", "2.0-1", 0),
    ("1.0-1~bpo1", "1.0-1", -1),
    ("1.0.0", "1.0", 1),
    ("1.0~~", "1.0~", -1),
    ("0:1.2", "1.2", 0),
    ("1.2-3+b1", "1.2-3", 1),
]


@pytest.mark.parametrize(("a", "b", "expected"), DPKG_ORDER)
def test_versions_order_as_dpkg_orders_them(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_newest_numbers_compare_as_numbers() -> None:
    assert newest(["6.12.9-1~deb12u1", "6.12.117-1~deb12u1", "6.12.10-1~deb12u1"]) == "6.12.117-1~deb12u1"
    assert newest([]) is None


META = """Package: linux-image-6.12-amd64
Version: 6.12.117-1~deb12u1
Depends: linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1)
Description: Linux for 64-bit PCs (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on PCs.

Package: linux-image-6.12-amd64
Version: 6.12.115-2~deb12u1
Depends: linux-image-6.12.115+deb12-amd64 (= 6.12.115-2~deb12u1)
"""
SOURCE = "\n\n".join(f"Package: linux-source-6.12\nVersion: {v}\nSize: 1" for v in
                     ("6.12.115-2~deb12u1", "6.12.117-1~deb12u1", "6.12.113-1~deb12u1"))


def test_stanzas_join_continuation_lines() -> None:
    first = stanzas(META)[0]
    assert first["Version"] == "6.12.117-1~deb12u1"
    assert first["Description"].endswith("and modules for use on PCs.")


def test_choose_takes_the_newest_version_both_offer_and_reads_the_abi_from_depends() -> None:
    kernel = choose(META, SOURCE)
    assert kernel == KernelPackages(version="6.12.117-1~deb12u1", abi="6.12.117+deb12")
    assert kernel.release == "6.12.117+deb12-amd64"
    assert kernel.pinned() == [
        "linux-image-6.12.117+deb12-amd64=6.12.117-1~deb12u1",
        "linux-headers-6.12.117+deb12-amd64=6.12.117-1~deb12u1",
        "linux-headers-6.12.117+deb12-common=6.12.117-1~deb12u1",
        "linux-kbuild-6.12.117+deb12=6.12.117-1~deb12u1",
        "linux-source-6.12=6.12.117-1~deb12u1",
    ]


def test_choose_falls_back_to_the_newest_version_with_a_source() -> None:
    sources = "Package: linux-source-6.12\nVersion: 6.12.115-2~deb12u1\n"
    assert choose(META, sources).abi == "6.12.115+deb12"


def test_no_common_version_names_the_suite_to_add() -> None:
    with pytest.raises(MissingPrerequisite, match="bookworm-security") as error:
        choose("", SOURCE)
    assert "apt-get update" in str(error.value)


def test_print_uris_give_file_names_and_sizes() -> None:
    text = ("'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' "
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:3d3f\n"
            "W: some warning\n")
    [item] = parse_print_uris(text)
    assert item.filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
    assert item.size == 928188 and item.checksum == "SHA256:3d3f"


def make_installed_layout(root: Path) -> None:
    """What dpkg-deb -x of the image, headers and kbuild packages leaves: links and includes for /."""
    rel, abi = "6.12.117+deb12-amd64", "6.12.117+deb12"
    modules = root / "lib" / "modules" / rel
    modules.mkdir(parents=True)
    headers = root / "usr" / "src" / f"linux-headers-{rel}"
    common = root / "usr" / "src" / f"linux-headers-{abi}-common"
    kbuild = root / "usr" / "lib" / f"linux-kbuild-{abi}" / "scripts"
    for directory in (headers, common, kbuild):
        directory.mkdir(parents=True)
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{rel}")
    (modules / "source").symlink_to(f"/usr/src/linux-headers-{abi}-common")
    (headers / "scripts").symlink_to(f"../../lib/linux-kbuild-{abi}/scripts")  # relative: kept
    (headers / "Makefile").write_text(f"include /usr/src/linux-headers-{abi}-common/Makefile\n")
    (common / "Makefile").write_text("VERSION = 6\n")


def test_fix_tree_points_absolute_links_and_includes_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_installed_layout(root)
    changes = fix_tree(root)
    assert len(changes) == 3
    build = root / "lib/modules/6.12.117+deb12-amd64/build"
    assert not os.readlink(build).startswith("/")
    assert build.resolve() == (root / "usr/src/linux-headers-6.12.117+deb12-amd64").resolve()
    assert os.readlink(root / "usr/src/linux-headers-6.12.117+deb12-amd64/scripts") == \
        "../../lib/linux-kbuild-6.12.117+deb12/scripts"
    makefile = root / "usr/src/linux-headers-6.12.117+deb12-amd64/Makefile"
    included = Path(makefile.read_text().split()[1])
    assert included == root / "usr/src/linux-headers-6.12.117+deb12-common/Makefile" and included.is_file()
    assert fix_tree(root) == [], "a second fix changes nothing"


def test_fix_tree_follows_a_cache_that_moved(tmp_path: Path) -> None:
    make_installed_layout(tmp_path / "old" / "root")
    fix_tree(tmp_path / "old" / "root")
    (tmp_path / "old").rename(tmp_path / "new")
    root = tmp_path / "new" / "root"
    assert len(fix_tree(root)) == 1, "only the include line names the old place; the links were relative"
    makefile = root / "usr/src/linux-headers-6.12.117+deb12-amd64/Makefile"
    assert Path(makefile.read_text().split()[1]).is_file()


def test_the_compiler_comes_from_the_headers_dependencies() -> None:
    depends = ("linux-base (>= 4.12~), linux-headers-6.12.117+deb12-common (= 6.12.117-1~deb12u1), "
               "linux-kbuild-6.12.117+deb12, gcc-12, libgcc-12-dev | gcc-12-plugin-dev")
    assert compilers_in(depends) == ["gcc-12"]
    assert compilers_in("linux-base") == []
