"""What one run asks of the guest: its vdpa devices, the command, its directory and environment.

All of it reaches the guest as one shell fragment (``/vdpacert/run.conf`` in a small cpio archive
appended to the cached initramfs), so nothing about a run is baked into the cached files and
nothing is squeezed through the kernel command line. Every value is quoted with
:func:`shlex.quote`, which both busybox ``sh`` (the init) and the host's ``sh`` (in the chroot) read.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import RunSpecError

#: Names the vdpa tool and the kernel accept for a device, a management device or an attribute.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: The command's HOME: under the chroot's /tmp, whose writes land on tmpfs (see initramfs).
GUEST_HOME = "/tmp/vdpacert-home"
#: Environment every command gets; ``env`` from the caller overrides it.
BASE_ENV: dict[str, str] = {
    "HOME": GUEST_HOME,
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    # The host's root is read-only in the guest: no byte-code caches, Hypothesis's database on tmpfs.
    "PYTHONDONTWRITEBYTECODE": "1",
    "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/vdpacert-hypothesis",
    "VDPACERT_IN_GUEST": "1",
}


@dataclass(frozen=True)
class VdpaDevice:
    """``vdpa dev add name NAME mgmtdev MGMTDEV [ATTR VALUE]...``, from ``NAME:MGMTDEV[:attr=value,...]``."""

    name: str
    mgmtdev: str
    attrs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> VdpaDevice:
        # At most two splits: attribute values (a MAC address) contain colons themselves.
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise RunSpecError(f"--dev {spec!r}: expected NAME:MGMTDEV[:attr=value,...], "
                                  f"e.g. vdpa0:vdpasim_net:mac=02:00:00:00:00:01")
        attrs: list[tuple[str, str]] = []
        if len(parts) == 3 and parts[2]:
            for item in parts[2].split(","):
                key, sep, value = item.partition("=")
                if not sep or not key or not value:
                    raise RunSpecError(f"--dev {spec!r}: attribute {item!r} is not attr=value")
                attrs.append((key, value))
        device = cls(parts[0], parts[1], tuple(attrs))
        device.validate()
        return device

    def validate(self) -> None:
        for what, value in (("name", self.name), ("management device", self.mgmtdev)):
            if not NAME.match(value):
                raise RunSpecError(f"vdpa device {what} {value!r}: use letters, digits, '_', '.', '-' (max 64)")
        for key, value in self.attrs:
            if not NAME.match(key) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
                raise RunSpecError(f"vdpa device {self.name}: attribute {key}={value!r} has characters "
                                      "the vdpa tool does not take")

    def vdpa_args(self) -> list[str]:
        """The arguments after ``vdpa``."""
        return ["dev", "add", "name", self.name, "mgmtdev", self.mgmtdev,
                *[word for pair in self.attrs for word in pair]]


def parse_env(items: Iterable[str]) -> dict[str, str]:
    """``K=V`` strings (``--env``) as a dict; a malformed one is an error naming it."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(key):
            raise RunSpecError(f"--env {item!r}: expected NAME=VALUE with NAME a shell variable name")
        out[key] = value
    return out


def guest_path(host_path: str) -> str:
    """The host's PATH without pyenv's shims, which cannot work from a read-only root.

    A shim is a bash script that runs ``pyenv exec`` (rehash locks, version files): in the guest it
    fails or crawls, so ``python3`` must resolve to a real interpreter; brief §6.
    """
    kept = [entry for entry in host_path.split(":") if entry and not entry.rstrip("/").endswith("/shims")]
    return ":".join(dict.fromkeys(kept)) or "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class GuestCommand:
    """Everything one run passes to the guest's init."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    devices: tuple[VdpaDevice, ...] = ()
    vdpa_tool: str = "/usr/sbin/vdpa"
    #: Marks the harness's own console lines; random per run, so a command printing a look-alike
    #: line cannot forge its exit status.
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        if not self.argv:
            raise RunSpecError("no command to run in the guest (give it after --)")
        if not self.cwd.startswith("/"):
            raise RunSpecError(f"working directory {self.cwd!r} must be absolute (it is a host path)")
        for key in self.env:
            if not ENV_NAME.match(key):
                raise RunSpecError(f"environment variable name {key!r} is not a shell variable name")
        names = [device.name for device in self.devices]
        if len(set(names)) != len(names):
            raise RunSpecError(f"vdpa device names repeat: {', '.join(names)}")
        for device in self.devices:
            device.validate()


def environment(host_path: str, overrides: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: a clean base (PATH from the host, HOME on tmpfs), then the caller's."""
    return {"PATH": guest_path(host_path), **BASE_ENV, **overrides}


def run_conf(command: GuestCommand) -> str:
    """The shell fragment ``/init`` sources: the nonce, a device-adding function and the command.

    Its functions call the init's ``add_device`` and ``fail`` (a failed ``vdpa dev add`` names itself).

    The command runs as ``env -i`` with exactly the given environment plus ``VDPACERT_VHOST_VDPA``
    (``name=/dev/vhost-vdpa-N`` pairs the init found for the devices it made), in ``cwd``.
    """
    q = shlex.quote
    lines = [f"VDPACERT_NONCE={q(command.nonce)}", f"VDPACERT_VDPA={q(command.vdpa_tool)}",
             f"VDPACERT_DEVICES={q(' '.join(device.name for device in command.devices))}",
             "vdpacert_add_devices() {"]
    for device in command.devices:
        args = device.vdpa_args()
        lines.append(f"    add_device {q(device.name)} {' '.join(q(arg) for arg in args)} "
                     f"|| fail {q('vdpa ' + ' '.join(args))}")
    lines += ["    return 0", "}", "vdpacert_command() {"]
    env_words = " ".join(q(f"{key}={value}") for key, value in command.env.items())
    argv_words = " ".join(q(arg) for arg in command.argv)
    # cd inside the chroot (the directory is a host path); 126 like a shell when it cannot be entered.
    script = 'cd -- "$1" || exit 126; shift; exec "$@"'
    lines.append(f"    chroot /host /usr/bin/env -i {env_words} \"VDPACERT_VHOST_VDPA=$VDPACERT_VHOST_VDPA\" "
                 f"/bin/sh -c {q(script)} vdpacert-run {q(command.cwd)} {argv_words} </dev/null")
    lines.append("}")
    return "\n".join(lines) + "\n"


def command_line(argv: Sequence[str]) -> str:
    """How a command is shown to the user."""
    return shlex.join(argv)
