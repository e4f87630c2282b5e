"""What a run asks of the guest survives the trip through the init's shell exactly (run here with the host's sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vdpacert.kernel.errors import RunSpecError
from vdpacert.kernel.guest import (
    BASE_ENV,
    GuestCommand,
    VdpaDevice,
    environment,
    guest_path,
    parse_env,
    run_conf,
)


def test_device_specs_keep_colons_in_attribute_values() -> None:
    device = VdpaDevice.parse("vdpa0:vdpasim_net:mac=02:00:00:00:00:01,mtu=1500")
    assert device == VdpaDevice("vdpa0", "vdpasim_net", (("mac", "02:00:00:00:00:01"), ("mtu", "1500")))
    assert device.vdpa_args() == ["dev", "add", "name", "vdpa0", "mgmtdev", "vdpasim_net",
                                  "mac", "02:00:00:00:00:01", "mtu", "1500"]
    assert VdpaDevice.parse("blk0:vdpasim_blk").vdpa_args() == ["dev", "add", "name", "blk0", "mgmtdev",
                                                                "vdpasim_blk"]


@pytest.mark.parametrize(("spec", "complaint"), [
    ("vdpa0", "expected NAME:MGMTDEV"),
    (":vdpasim_net", "expected NAME:MGMTDEV"),
    ("vdpa0:vdpasim_net:mac", "is not attr=value"),
    ("vdpa0;reboot:vdpasim_net", "use letters, digits"),
    ("vdpa0:vdpasim_net:mac=$(reboot)", "characters the vdpa tool does not take"),
])
def test_bad_device_specs_are_refused_with_the_reason(spec: str, complaint: str) -> None:
    with pytest.raises(RunSpecError, match=complaint.replace("(", r"\(").replace("$", r"\$")):
        VdpaDevice.parse(spec)


def test_env_items_parse_and_bad_ones_are_named() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(RunSpecError, match="'1A=2'"):
        parse_env(["1A=2"])
    with pytest.raises(RunSpecError, match="'NOEQUALS'"):
        parse_env(["NOEQUALS"])


def test_pyenv_shims_leave_the_guest_path() -> None:
    assert guest_path("/root/.pyenv/shims:/root/.pyenv/bin:/usr/bin:/usr/bin:/bin") == "/root/.pyenv/bin:/usr/bin:/bin"
    assert guest_path("") != ""


def test_environment_layers_caller_over_base() -> None:
    env = environment("/usr/bin", {"TERM": "xterm", "X": "1"})
    assert env["PATH"] == "/usr/bin" and env["TERM"] == "xterm" and env["X"] == "1"
    assert env["HOME"] == BASE_ENV["HOME"] and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HYPOTHESIS_STORAGE_DIRECTORY"].startswith("/tmp/")


def test_commands_are_checked_before_anything_boots() -> None:
    with pytest.raises(RunSpecError, match="no command"):
        GuestCommand(argv=(), cwd="/", env={})
    with pytest.raises(RunSpecError, match="absolute"):
        GuestCommand(argv=("true",), cwd="relative", env={})
    with pytest.raises(RunSpecError, match="repeat"):
        GuestCommand(argv=("true",), cwd="/", env={}, devices=(VdpaDevice("a", "x"), VdpaDevice("a", "y")))
    assert GuestCommand(("true",), "/", {}).nonce != GuestCommand(("true",), "/", {}).nonce


#: Stands in for the parts of the init run.conf relies on: chroot runs its command here instead.
HARNESS = """
chroot() { shift; "$@"; }
fail() { echo "FAIL:$*"; exit 9; }
add_device() { echo "ADD:$*"; [ "$1" != bad ]; }
. "$1"
VDPACERT_VHOST_VDPA='vdpa0=/dev/vhost-vdpa-0'
vdpacert_add_devices
vdpacert_command
echo "status:$?"
"""

REPORT = "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), dict(os.environ)]))"


def run_through_sh(tmp_path: Path, command: GuestCommand) -> list[str]:
    conf = tmp_path / "run.conf"
    conf.write_text(run_conf(command))
    done = subprocess.run(["sh", "-c", HARNESS, "harness", str(conf)], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()


def test_argv_cwd_and_environment_arrive_exactly(tmp_path: Path) -> None:
    tricky = ["two words", "it's", '"quoted"', "$HOME", "`id`", "semi;colon", "new\nline", "*", ""]
    env = {"PATH": "/usr/bin:/bin", "SPACE": "a b", "DOLLAR": "$x", "QUOTE": "'"}
    command = GuestCommand(argv=(sys.executable, "-c", REPORT, *tricky), cwd=str(tmp_path), env=env,
                           devices=(VdpaDevice.parse("vdpa0:vdpasim_net:mac=02:00:00:00:00:01"),))
    lines = run_through_sh(tmp_path, command)
    assert lines[0] == "ADD:vdpa0 dev add name vdpa0 mgmtdev vdpasim_net mac 02:00:00:00:00:01"
    argv, cwd, seen = json.loads(lines[1])
    assert argv == tricky
    assert cwd == str(tmp_path)
    assert seen.pop("VDPACERT_VHOST_VDPA") == "vdpa0=/dev/vhost-vdpa-0"
    for added in ("PWD", "OLDPWD", "LC_CTYPE"):  # sh's cd, and python's C-locale coercion (PEP 538)
        seen.pop(added, None)
    assert seen == env, "env -i: nothing from the init's environment leaks in"
    assert lines[-1] == "status:0"


def test_exit_status_comes_back_and_a_missing_directory_is_126(tmp_path: Path) -> None:
    lines = run_through_sh(tmp_path, GuestCommand(argv=("sh", "-c", "exit 7"), cwd="/", env={"PATH": "/bin"}))
    assert lines[-1] == "status:7"
    lines = run_through_sh(tmp_path, GuestCommand(argv=("true",), cwd="/no/such/dir", env={"PATH": "/bin"}))
    assert lines[-1] == "status:126"


def test_a_failing_device_names_its_vdpa_command(tmp_path: Path) -> None:
    lines = run_through_sh(tmp_path, GuestCommand(argv=("true",), cwd="/", env={},
                                                  devices=(VdpaDevice("ok", "vdpasim_net"),
                                                           VdpaDevice("bad", "vdpasim_blk"))))
    assert lines[-1] == "FAIL:vdpa dev add name bad mgmtdev vdpasim_blk"
