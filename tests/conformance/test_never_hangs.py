"""The suite never hangs and never crashes on a bad device: it reports it, by clause, and the run ends.

Each certification runs ``vdpacert certify`` in a fresh process, as a user or a CI job does, under a
generous subprocess timeout: a suite that hangs fails the test (TimeoutExpired) instead of wedging CI.
The devices are the vendor parents of :mod:`hang_parents`; the suite is the net datapath machine
alone (:mod:`never_hangs_suite`), the machine that waits on devices. What is checked is the
user-visible outcome: exit status 1, and the JSON report's failures, each naming a catalog clause.
The in-process tests hold the driver's own waits to their deadlines and to TargetDied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vdpacert.conformance import clauses
from vdpacert.conformance.client import TargetDied
from vdpacert.conformance.driver import DeviceTimeout
from vdpacert.conformance.driver.device import DriverSession, net_queues
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.targets import make_target
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1

HERE = Path(__file__).resolve().parent
#: Far above a run's real length (seconds): only a hang reaches it.
HANG = 240
FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM


def certify(tmp_path: Path, factory: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["VDPACERT_SETTLE"] = "0.2"  # a real device's settle time; embedded targets use their own
    done = subprocess.run([sys.executable, "-m", "vdpacert", "certify", "--target", f"python:hang_parents:{factory}",
                           "--suite", "never_hangs_suite", "--seed", "3", "--examples", "3", "--json", "r.json",
                           *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)
    assert (tmp_path / "r.json").exists(), done.stdout + done.stderr
    return done, json.loads((tmp_path / "r.json").read_text())


def failures(report: dict[str, Any]) -> dict[str, str]:
    found = {f["clause"]: f["message"] for f in report["failures"]}
    assert found and all(clauses.is_clause(c) for c in found), report["failures"]
    return found


def test_a_device_that_never_uses_a_buffer_fails_by_clause_and_the_run_ends(tmp_path: Path) -> None:
    done, report = certify(tmp_path, "swallows_kicks")
    assert done.returncode == 1 and report["exit_status"] == 1, done.stdout + done.stderr
    found = failures(report)
    assert "suite.target.alive" not in found  # it answers every ioctl: slow, not dead
    assert any("never used" in m or "did not answer within" in m for m in found.values()), found
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("factory", "said"), [("crashes_on_kick", "kick processing: RuntimeError"),
                                               ("dies_on_kick", "[Errno 5]")])
def test_a_device_that_dies_mid_run_is_reported_as_dead(tmp_path: Path, factory: str, said: str) -> None:
    done, report = certify(tmp_path, factory)
    assert done.returncode == 1 and report["exit_status"] == 1, done.stdout + done.stderr
    found = failures(report)
    assert list(found) == ["suite.target.alive"], found
    assert "the target died during" in found["suite.target.alive"] and said in found["suite.target.alive"]
    assert "suite.target.alive" in done.stdout and "Traceback" not in done.stderr


def test_a_device_that_never_signals_fails_the_notification_check(tmp_path: Path) -> None:
    done, report = certify(tmp_path, "never_signals")
    assert done.returncode == 1, done.stdout + done.stderr
    found = failures(report)
    assert all(c.startswith(("notify.", "suite.notify.")) for c in found), found
    assert any("notification was not sent" in m or "call eventfd" in m for m in found.values()), found


def test_a_device_that_never_returns_from_a_call_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    done, report = certify(tmp_path, "blocks_forever", "--deadline", "3")
    assert done.returncode == 1 and report["exit_status"] == 1, done.stdout + done.stderr
    found = failures(report)
    assert list(found) == ["suite.target.alive"], found
    assert "did not finish within its 3 s deadline" in found["suite.target.alive"]
    assert "Traceback" not in done.stderr


# ----- the driver's waits, in process ----------------------------------------------------------------------

def session_on(factory: str) -> tuple[Any, DriverSession]:
    target = make_target(f"python:hang_parents:{factory}")
    layout = GuestLayout(target.new_memory(1 << 20, gpa=0x100_0000))
    session = DriverSession(target.client, layout, FEATURES, queues=net_queues(FEATURES), num=8,
                            service=target.service, timeout=0.1)
    return target, session.bring_up()


@pytest.fixture(autouse=True)
def _on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))


def test_reap_from_a_silent_device_is_a_timeout_not_a_hang() -> None:
    target, session = session_on("swallows_kicks")
    with target, session:
        session.post_rx(0, 2)
        session.send_frames(0, [bytes(64)])
        with pytest.raises(DeviceTimeout) as caught:
            session.tx_done(0, 1)
        assert caught.value.timeout == 0.1 and "0 of 1 used entries" in str(caught.value)
        assert not target.wait_call(session.calls[1], 0.05)


def test_a_file_closed_under_the_driver_is_target_died_not_a_timeout() -> None:
    target, session = session_on("never_signals")
    with target:
        session.post_rx(0, 1)
        target.client.channel.close()  # the device's file goes away (a hot-unplug, a crashed daemon)
        session.send_frames(0, [bytes(64)], kick=False)
        with pytest.raises(TargetDied, match="closed under the driver"):
            session.kick(1)
        with pytest.raises(TargetDied):
            target.client.get_status()
        with pytest.raises(TargetDied):  # the reset cannot reach it; the session's own resources are freed
            session.close()
        assert not session.rings and not session.up


def test_a_crashing_kick_handler_is_target_died_with_the_parents_error() -> None:
    target, session = session_on("crashes_on_kick")
    with target, session:
        session.post_rx(0, 1, kick=False)
        with pytest.raises(TargetDied, match="RuntimeError: firmware assertion on queue 0") as caught:
            session.kick(0)
        assert caught.value.operation == "kick processing"
        assert target.client.get_status() != 0  # the control path still answers: only the datapath died
