"""``vdpacert kernel``: usage errors exit 2, an unprepared cache exits 125 naming prepare, the command after --."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdpacert.cli import build_parser, main
from vdpacert.kernel import KernelBuild, RunSpecError, run


def test_kernel_is_a_listed_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "kernel" in capsys.readouterr().out


def test_everything_after_the_double_dash_is_the_command() -> None:
    args = build_parser().parse_args(["kernel", "run", "--dev", "vdpa0:vdpasim_net", "--env", "A=1", "--",
                                      "python", "-m", "pytest", "--dev", "-x"])
    assert args.dev == ["vdpa0:vdpasim_net"] and args.env == ["A=1"]
    assert args.command[-5:] == ["python", "-m", "pytest", "--dev", "-x"]


def test_run_without_a_command_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "run", "--cache", str(tmp_path)]) == 2
    assert "after --" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "complaint"), [
    (["--dev", "vdpa0"], "NAME:MGMTDEV"), (["--env", "NO_EQUALS"], "NAME=VALUE")])
def test_bad_devices_and_env_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              option: list[str], complaint: str) -> None:
    assert main(["kernel", "run", "--cache", str(tmp_path), *option, "--", "true"]) == 2
    assert complaint in capsys.readouterr().err


def test_an_unprepared_cache_is_a_harness_error_naming_prepare(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "run", "--cache", str(tmp_path), "--", "true"]) == 125
    assert f"vdpacert kernel prepare --cache {tmp_path}" in capsys.readouterr().err


def test_the_cache_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VDPACERT_KERNEL_CACHE", str(tmp_path / "from-env"))
    assert main(["kernel", "run", "--", "true"]) == 125
    assert str(tmp_path / "from-env") in capsys.readouterr().err


def test_a_missing_working_directory_is_refused_before_booting(tmp_path: Path) -> None:
    build = KernelBuild(cache=tmp_path, version="v", release="r", vmlinuz=tmp_path / "none",
                        initramfs=tmp_path / "none", modules=(), qemu=tmp_path / "none")
    with pytest.raises(RunSpecError, match="/no/such/dir"):
        run(build, ["true"], cwd="/no/such/dir")
    with pytest.raises(RunSpecError, match="vdpa0"):
        run(build, ["true"], devices=["vdpa0"], cwd=tmp_path)


def test_prepare_help_names_the_cache_and_refresh(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["kernel", "prepare", "--help"])
    out = capsys.readouterr().out
    assert "--cache DIR" in out and "VDPACERT_KERNEL_CACHE" in out and "--refresh" in out
