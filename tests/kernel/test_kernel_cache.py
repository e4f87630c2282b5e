"""The cache layout, the build record, and the errors of a cache that holds no usable kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdpacert.kernel.cache import CACHE_ENV, KernelBuild, Layout, default_cache, find_build, load_build
from vdpacert.kernel.errors import NotPrepared
from vdpacert.kernel.initramfs import recipe

RELEASE = "6.12.117+deb12-amd64"


def test_default_cache_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache() == tmp_path / "xdg" / "vdpacert" / "kernel"


def test_layout_keeps_each_release_apart(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert layout.debs == tmp_path / "debs"
    assert layout.root(RELEASE) == tmp_path / RELEASE / "root"
    assert layout.initramfs(RELEASE) == tmp_path / RELEASE / "initramfs.cpio"
    assert not layout.done(RELEASE, "unpack")
    layout.mark(RELEASE, "unpack", "3 fixes")
    assert layout.done(RELEASE, "unpack") and layout.stamp(RELEASE, "unpack").read_text() == "3 fixes"


def make_build(cache: Path, recipe_digest: str | None = None) -> KernelBuild:
    layout = Layout(cache)
    vmlinuz = layout.root(RELEASE) / "boot" / f"vmlinuz-{RELEASE}"
    vmlinuz.parent.mkdir(parents=True)
    vmlinuz.write_bytes(b"kernel")
    layout.initramfs(RELEASE).write_bytes(b"070701")
    build = KernelBuild(cache=cache, version="6.12.117-1~deb12u1", release=RELEASE, vmlinuz=vmlinuz,
                        initramfs=layout.initramfs(RELEASE), modules=("vhost_iotlb", "vdpa"),
                        qemu=Path("/bin/sh"), recipe=recipe() if recipe_digest is None else recipe_digest)
    layout.manifest(RELEASE).write_text(build.to_json())
    layout.current.write_text(RELEASE + "\n")
    return build


def test_a_finished_build_round_trips_through_its_record(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    assert KernelBuild.from_json(build.to_json()) == build
    assert load_build(tmp_path) == build


def test_an_empty_cache_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(NotPrepared, match=rf"no prepared kernel in {tmp_path}: run `vdpacert kernel prepare"):
        load_build(tmp_path)
    assert find_build(tmp_path) is None


def test_a_build_by_another_harness_version_must_be_prepared_again(tmp_path: Path) -> None:
    make_build(tmp_path, recipe_digest="0" * 16)
    with pytest.raises(NotPrepared, match="another version of vdpacert"):
        load_build(tmp_path)


def test_a_build_whose_files_are_gone_names_them(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    build.initramfs.unlink()
    with pytest.raises(NotPrepared, match=r"initramfs\.cpio"):
        load_build(tmp_path)


def test_the_lock_can_be_taken_again_after_release(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "new")
    with layout.locked():
        assert (tmp_path / "new" / ".lock").exists()
    with layout.locked():
        pass
