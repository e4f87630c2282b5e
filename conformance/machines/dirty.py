"""The dirty-log check both datapath machines run after every step (brief §5, Linux ``vhost_log_write``).

With VHOST_F_LOG_ALL negotiated and a bitmap installed (SET_LOG_BASE by user address, SET_LOG_FD),
the device must mark every guest page it writes: the bytes of device-writable buffers and, for a
vring set up with VHOST_VRING_F_LOG, the used ring (logged at ``log_guest_addr``). The suite knows
what the device wrote without trusting it: a :class:`~vdpacert.conformance.driver.memory.Snapshot`
of the layout taken before the step, compared with memory after it. Every page holding a changed
byte must be marked (MUST, ``suite.dirty_log.covers_writes`` for buffers and
``suite.dirty_log.covers_used_ring`` for ring areas). A marked page the device could not have
written (no device-writable window touched it since the snapshot, and none of its bytes changed) is
a spurious mark (SHOULD, ``suite.dirty_log.no_spurious``): a page the device may have rewritten
with the same bytes is never called spurious, because the suite cannot tell.

The bitmap is indexed by guest-physical page. The rings are given ``log_guest_addr`` = the gpa of
their device area, so ring writes land in the log at their true page and one comparison covers both.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdpacert.conformance.driver.memory import PAGE, GuestLayout, Snapshot, changed_runs
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.model.dirty_log import VHOST_PAGE_SIZE, log_size_for
from vdpacert.uapi import vhost_types as T  # noqa: N812

__all__ = ["COVERS_USED_RING", "COVERS_WRITES", "NO_SPURIOUS", "DirtyFinding", "DirtyLogWatch", "changed_pages",
           "log_bytes_for"]

COVERS_WRITES = "suite.dirty_log.covers_writes"
COVERS_USED_RING = "suite.dirty_log.covers_used_ring"
NO_SPURIOUS = "suite.dirty_log.no_spurious"
#: Window names (GuestLayout.allow ``what``) that are ring areas rather than buffers.
_RING_WINDOW_WORDS = ("used flags/idx/ring", "avail_event", "device event suppression", "descriptor slot")

assert PAGE == VHOST_PAGE_SIZE, "the layout's pages are the log's pages"


@dataclass(frozen=True)
class DirtyFinding:
    """One thing the log got wrong: the clause and what, page by guest-physical number."""

    clause: str
    message: str


def log_bytes_for(layout: GuestLayout) -> int:
    """Bytes of bitmap covering guest-physical memory up to the end of the layout (whole pages of log)."""
    need = log_size_for(layout.gpa_base + layout.size)
    return max(PAGE, (need + PAGE - 1) // PAGE * PAGE)


def changed_pages(layout: GuestLayout, snapshot: Snapshot) -> dict[int, list[tuple[int, int]]]:
    """Layout page index -> runs ``(offset, end)`` of bytes changed since ``snapshot`` (all of memory)."""
    return changed_runs(snapshot.data, layout.memory.read(0, layout.size))


class DirtyLogWatch:
    """A log bitmap in its own guest memory, installed on a device, and the per-step comparison."""

    def __init__(self, layout: GuestLayout, log: GuestMemory) -> None:
        if layout.gpa_base % PAGE:
            raise ValueError("the layout's guest-physical base must be page aligned for page-exact logging")
        if log.size < log_size_for(layout.gpa_base + layout.size):
            raise ValueError(f"a {log.size}-byte log does not cover the layout's pages")
        self.layout = layout
        self.log = log
        self.active = False  # VHOST_F_LOG_ALL negotiated and the bitmap installed

    # ----- setup -----------------------------------------------------------------------------------------

    def vring_log(self, device_area_iova: int) -> tuple[int, int]:
        """(flags, log_guest_addr) for SET_VRING_ADDR: log used-ring writes at the device area's own gpa."""
        return 1 << T.VHOST_VRING_F_LOG, self.layout.gpa(self.layout.offset_of_iova(device_area_iova))

    def clear(self) -> None:
        """What the migration thread does between rounds: every bit back to 0."""
        self.log.fill(0, self.log.size, 0)

    def marked(self) -> set[int]:
        """Guest-physical page numbers whose bit is set."""
        raw = self.log.read(0, self.log.size)
        pages: set[int] = set()
        for index, byte in enumerate(raw):
            if byte:
                pages.update(index * 8 + bit for bit in range(8) if byte >> bit & 1)
        return pages

    # ----- the check ---------------------------------------------------------------------------------------

    def check(self, snapshot: Snapshot) -> list[DirtyFinding]:
        """Findings for the step since ``snapshot`` (empty when the log is exactly right)."""
        layout = self.layout
        marked = self.marked()
        if not self.active:
            return [DirtyFinding(NO_SPURIOUS, f"{len(marked)} page(s) marked while VHOST_F_LOG_ALL is not "
                                              f"negotiated: first gpa pages {sorted(marked)[:6]}")] if marked else []
        changed = changed_pages(layout, snapshot)
        windows = layout.windows(snapshot)
        ring_windows = [w for w in windows if any(word in w.what for word in _RING_WINDOW_WORDS)]
        first_gpa_page = layout.gpa_base // PAGE
        findings: list[DirtyFinding] = []
        missed_ring: list[tuple[int, int, str]] = []
        missed_buffers: list[tuple[int, int, str]] = []
        for page, runs in sorted(changed.items()):
            gpa_page = first_gpa_page + page
            if gpa_page in marked:
                continue
            in_ring = any(start < w.end and w.offset < end for start, end in runs for w in ring_windows)
            (missed_ring if in_ring else missed_buffers).append((gpa_page, runs[0][0], layout.owner(runs[0][0])))
        for clause, missed in ((COVERS_USED_RING, missed_ring), (COVERS_WRITES, missed_buffers)):
            if missed:
                shown = ", ".join(f"gpa page {p:#x} (offset {o:#x}, {what})" for p, o, what in missed[:4])
                findings.append(DirtyFinding(clause, f"{len(missed)} written page(s) not marked in the dirty log: "
                                                     f"{shown}"))
        writable_pages = {first_gpa_page + page for w in windows
                          for page in range(w.offset // PAGE, (w.end - 1) // PAGE + 1)} if windows else set()
        spurious = sorted(p for p in marked
                          if p not in writable_pages and p - first_gpa_page not in changed)
        if spurious:
            findings.append(DirtyFinding(NO_SPURIOUS, f"{len(spurious)} page(s) marked that the device had no "
                                                      f"business writing: gpa pages {[hex(p) for p in spurious[:6]]}"))
        return findings

