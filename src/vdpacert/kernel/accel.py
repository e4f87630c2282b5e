"""KVM or TCG: use KVM only where a probe boot shows it really runs the guest, else TCG.

On the machines this was written on, ``/dev/kvm`` exists yet KVM cannot run a stock guest kernel
(QEMU aborts setting an MSR with ``-cpu host``, or the vCPU stops with "KVM internal error"), brief
§6. So the presence of /dev/kvm proves nothing: the first run boots ``true`` under KVM, and the
verdict is kept in the cache, keyed by what decides it (host kernel, QEMU binary, guest kernel), so
later runs neither pay for the probe nor trust a verdict from another host or QEMU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import write_atomic
from .errors import RunSpecError

KVM_DEVICE = Path("/dev/kvm")
CHOICES = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a run uses and why (shown to the user: TCG is ~10x slower, they should know why)."""

    accel: str
    reason: str


def probe_key(qemu: Path, release: str) -> dict[str, str]:
    stat = qemu.stat()
    return {"host_kernel": os.uname().release, "qemu": str(qemu), "qemu_id": f"{stat.st_size}:{stat.st_mtime_ns}",
            "guest_kernel": release}


def kvm_unavailable(device: Path = KVM_DEVICE) -> str | None:
    """Why KVM cannot even be tried, or None."""
    if not device.exists():
        return f"no {device}"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"no read/write access to {device} (add the user to group kvm)"
    return None


def choose_accel(requested: str, *, qemu: Path, release: str, verdicts: Path,
                 probe: Callable[[], str | None], device: Path = KVM_DEVICE) -> AccelChoice:
    """Decide the accelerator; ``probe`` boots under KVM and returns why it failed, or None if it worked.

    ``requested`` "kvm" or "tcg" is obeyed without probing; "auto" probes at most once per key.
    """
    if requested not in CHOICES:
        raise RunSpecError(f"accelerator {requested!r}: expected one of {', '.join(CHOICES)}")
    if requested != "auto":
        return AccelChoice(requested, "as asked")
    unavailable = kvm_unavailable(device)
    if unavailable:
        return AccelChoice("tcg", unavailable)
    key = probe_key(qemu, release)
    try:
        cached = json.loads(verdicts.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
        return AccelChoice(str(cached["accel"]), f"{cached.get('reason', '')}; verdict cached in {verdicts}")
    failure = probe()
    choice = (AccelChoice("kvm", "a KVM probe boot worked") if failure is None
              else AccelChoice("tcg", f"KVM probe failed: {failure}"))
    verdicts.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(verdicts, json.dumps({"key": key, "accel": choice.accel, "reason": choice.reason}, indent=2))
    return choice
