"""The kernel harness: run a command on a real Linux 6.12 with vdpa_sim, in QEMU, from one call.

Debian's 6.12 kernel ships the vDPA framework but not its simulator; :func:`prepare` fetches the
kernel with apt (unpacked, never installed), builds vringh and vdpa_sim* out of tree, and builds a
busybox initramfs. :func:`run` boots it (KVM if it really works here, else TCG), shares the host's
root read-only over 9p, creates the vdpa devices asked for and runs the command there, streaming
its output and returning its exit status. ``vdpacert kernel prepare`` / ``vdpacert kernel run``
are the command line over these two calls.
"""

from __future__ import annotations

from .cache import KernelBuild, default_cache, load_build
from .errors import (
    GuestError,
    GuestSetupError,
    GuestTimeout,
    KernelHarnessError,
    MissingPrerequisite,
    NotPrepared,
    PrepareError,
    RunSpecError,
)
from .guest import VdpaDevice
from .prepare import prepare
from .run import RunResult, run

__all__ = [
    "GuestError",
    "GuestSetupError",
    "GuestTimeout",
    "KernelBuild",
    "KernelHarnessError",
    "MissingPrerequisite",
    "NotPrepared",
    "PrepareError",
    "RunResult",
    "RunSpecError",
    "VdpaDevice",
    "default_cache",
    "load_build",
    "prepare",
    "run",
]
