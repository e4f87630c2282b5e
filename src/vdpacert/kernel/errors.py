"""What can go wrong in the kernel harness, as typed errors whose message says what to do.

The harness drives other people's tools (apt, make, QEMU) on a machine it does not own, so most
failures are the machine's, not the caller's: each error names the missing piece or the failed
step and the command that fixes it, rather than surfacing a raw ``CalledProcessError``.
"""

from __future__ import annotations


class KernelHarnessError(Exception):
    """Base of every harness error; the message is meant to be shown to the user as it is."""


class MissingPrerequisite(KernelHarnessError):
    """A host tool, package source or resource the harness needs is absent."""

    def __init__(self, what: str, remedy: str) -> None:
        self.what = what
        self.remedy = remedy
        super().__init__(f"{what}: {remedy}")


class PrepareError(KernelHarnessError):
    """A step of ``prepare`` (download, unpack, build) ran and failed."""

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        self.detail = detail
        super().__init__(f"{step} failed: {detail}")


class NotPrepared(KernelHarnessError):
    """``run`` was asked for before ``prepare`` filled the cache."""


class RunSpecError(KernelHarnessError, ValueError):
    """A run asked for wrongly: a ``--dev`` or ``--env`` the harness cannot pass on safely, a missing ``--cwd``."""


class GuestError(KernelHarnessError):
    """The guest stopped without reporting the command's exit status (boot failure, panic, setup step).

    ``console`` keeps the guest's last console lines: the kernel's own words are the best diagnosis.
    """

    def __init__(self, message: str, console: str = "") -> None:
        self.console = console
        tail = "\n".join(console.splitlines()[-30:])
        super().__init__(f"{message}\n--- last guest console lines ---\n{tail}" if tail else message)


class GuestSetupError(GuestError):
    """A setup step of the guest's init (a module, the 9p mount, ``vdpa dev add``...) failed."""

    def __init__(self, step: str, console: str = "") -> None:
        self.step = step
        super().__init__(f"guest setup failed at: {step}", console)


class GuestTimeout(KernelHarnessError):
    """The guest did not finish within the timeout; QEMU was killed."""

    def __init__(self, timeout: float, console: str = "") -> None:
        self.timeout = timeout
        self.console = console
        tail = "\n".join(console.splitlines()[-10:])
        message = (f"the guest did not finish within the timeout of {timeout:g} s; QEMU was killed "
                   f"(raise --timeout if the command needs longer)")
        super().__init__(f"{message}\n--- last guest console lines ---\n{tail}" if tail else message)
