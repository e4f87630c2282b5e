"""A missing prerequisite is one clear error naming what to install; a failed tool names its step."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdpacert.kernel.errors import MissingPrerequisite, PrepareError
from vdpacert.kernel.host import PREPARE_TOOLS, Tool, check_space, compiler_tool, find_tools, run_tool


def test_every_missing_tool_is_named_with_one_install_line() -> None:
    tools = [Tool("vdpacert-no-such-make", "make", "runs the build"),
             Tool("vdpacert-no-such-gcc-12", "gcc-12", "compiles"), Tool("sh", "dash", "a shell")]
    with pytest.raises(MissingPrerequisite) as error:
        find_tools(tools, path="")
    message = str(error.value)
    assert "vdpacert-no-such-make (runs the build)" in message and "vdpacert-no-such-gcc-12" in message
    assert "apt-get install make gcc-12" in message
    assert "dash" not in message, "tools that are there are not named"


def test_prepare_needs_apt_dpkg_make_xz_and_binutils() -> None:
    assert {tool.package for tool in PREPARE_TOOLS} == {"apt", "dpkg", "make", "xz-utils", "binutils"}


def test_found_tools_are_absolute_paths() -> None:
    found = find_tools([Tool("sh", "dash", "a shell")], path="")
    assert found["sh"].is_absolute(), "system directories are searched even with an empty PATH"


CONFIG = 'CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"\nCONFIG_CC_IS_GCC=y\n'


def test_the_compiler_is_the_one_the_kernel_was_built_with() -> None:
    tool = compiler_tool(CONFIG)
    assert (tool.command, tool.package) == ("x86_64-linux-gnu-gcc-12", "gcc-12")
    with pytest.raises(PrepareError, match="CONFIG_CC_VERSION_TEXT"):
        compiler_tool("CONFIG_X=y\n")


def test_too_little_space_names_the_free_space_and_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(MissingPrerequisite, match=r"MiB free.*--cache DIR"):
        check_space(tmp_path / "not" / "yet", needed_mib=1 << 40)
    check_space(tmp_path / "not" / "yet", needed_mib=1)


def test_a_failing_tool_names_the_step_the_command_and_its_stderr() -> None:
    with pytest.raises(PrepareError) as error:
        run_tool(["sh", "-c", "echo noise; echo 'E: the real reason' >&2; exit 3"], "unpacking x.deb")
    message = str(error.value)
    assert message.startswith("unpacking x.deb failed:")
    assert "exited with status 3" in message and "E: the real reason" in message


def test_a_missing_binary_is_a_missing_prerequisite() -> None:
    with pytest.raises(MissingPrerequisite, match="vdpacert-no-such-tool not found"):
        run_tool(["vdpacert-no-such-tool"], "a step")


def test_apt_unable_to_reach_the_mirror_is_reported_as_no_network(tmp_path: Path) -> None:
    apt = tmp_path / "apt-get"  # stands in for apt-get on a machine without network
    apt.write_text("#!/bin/sh\necho \"E: Failed to fetch http://deb.debian.org/x.deb  Temporary failure "
                   "resolving 'deb.debian.org'\" >&2\nexit 100\n")
    apt.chmod(0o755)
    with pytest.raises(MissingPrerequisite, match="could not reach the Debian mirrors") as error:
        run_tool([str(apt), "download", "x"], "apt-get download")
    assert "check the network" in str(error.value)
