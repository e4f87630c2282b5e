"""A live migration between two Linux vdpa_sim devices inside a guest kernel, verified (issue 6).

Three ``vdpasim_net`` devices in one guest: the source, the destination and the unmigrated twin.
Linux's vhost-vdpa cannot log dirty pages, so the migration finds them with shadow virtqueues;
``vdpacert migrate`` verifies memory and device state at switch-over and the differential run after
it. The JSON it writes (inside the guest, on its writable /tmp) is printed after a marker line so
this test reads the verdict itself, not only the exit status.

    python -m pytest kernel_tests -p no:cacheprovider
"""

from __future__ import annotations

import json
import sys

import pytest

from vdpacert.kernel import KernelBuild, default_cache, prepare, run

TIMEOUT = 600.0
MARK = "--- vdpacert migrate json ---"
DEVICES = [f"vdpa{i}:vdpasim_net:mac=02:00:00:00:00:0{i + 1}" for i in range(3)]


@pytest.fixture(scope="module")
def build() -> KernelBuild:
    return prepare(default_cache(), progress=lambda line: print(f"prepare: {line}", file=sys.stderr))


def test_a_net_guest_migrates_between_two_vdpa_sim_devices_with_nothing_lost(build: KernelBuild) -> None:
    script = (f'"{sys.executable}" -m vdpacert migrate linux/vdpa-sim-net-shadow --json /tmp/migrate.json; '
              f'status=$?; echo "{MARK}"; cat /tmp/migrate.json; exit $status')
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(line)
        print(line)

    result = run(build, ["sh", "-c", script], devices=DEVICES, cwd="/tmp", timeout=TIMEOUT, output=keep)
    assert result.exit_status == 0, result.output
    rows = json.loads("\n".join(lines[lines.index(MARK) + 1:]))
    assert len(rows) == 1
    row = rows[0]
    assert row["scenario"] == "vdpa-sim-net-shadow"
    assert row["verified"] is True and row["passed"] is True and row["error"] is None
    assert row["converged"] is True and row["iterations"] >= 1 and row["bytes_sent"] >= 16 << 20
    assert any("byte-equal at switch-over" in line for line in row["checks"])
    assert any("device state equal" in line for line in row["checks"])
    assert any("guest and twin agree" in line for line in row["checks"])
