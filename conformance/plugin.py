"""The pytest plugin: ``pytest --pyargs vdpacert.conformance --vdpa-target=sim-net``.

Installed as the ``pytest11`` entry point ``vdpacert`` (``vdpacert certify`` loads it with ``-p``).
It adds the ``--vdpa-*`` options, holds one :class:`ConformanceRun` per process (the target,
profiles, seed and the :class:`~vdpacert.conformance.verdicts.Recorder`), and builds the report
at the end of the session.

Parallel runs (pytest-xdist): every worker opens its *own* target the first time it needs one
(to learn the device id the suite is parametrised over) and records into its own recorder. At
the end of its session a worker sends its recorder and what it learned about the device to the
controller through ``workeroutput`` (and leaves the same JSON as a fragment in the report
directory); the controller merges them as they arrive (``pytest_testnodedown``) and builds the
one report. Without xdist the process's own recorder is the run's. The seed is chosen once, by
the controller, and handed to every worker, so all workers run the same examples a single
process would.

The plugin is inert in a session that collects no suite test: importing it costs nothing and
it writes nothing, so it may stay installed in any project.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from hypothesis import settings as Settings  # noqa: N812 - the Hypothesis class, imported lazily

    from vdpacert.conformance.profiles import RunProfile, TargetProfile
    from vdpacert.conformance.report import Report
    from vdpacert.conformance.suite import SuiteEntry
    from vdpacert.conformance.targets import Target
    from vdpacert.conformance.verdicts import Recorder

__all__ = [
    "ENTRY_FIXTURE",
    "ConformanceRun",
    "DeviceInfo",
    "VdpaWarning",
    "current",
    "final_report",
    "parse_shard",
    "shard",
]

#: The parameter every suite test takes; items that use it are the suite's (and only those are sharded).
ENTRY_FIXTURE: Final = "vdpa_suite_entry"
#: workeroutput / workerinput keys.
_PAYLOAD: Final = "vdpacert"
_SEED: Final = "vdpacert_seed"
_STARTED: Final = "vdpacert_started"


#: Values of ``--vdpa-on-failure`` (see :attr:`ConformanceRun.keeps_going`).
ON_FAILURE: Final = ("auto", "shrink", "continue")


class VdpaWarning(UserWarning):
    """A SHOULD clause the target did not follow (reported, the test still passes)."""


# ----- options -----------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vdpacert", "vdpacert conformance suite")
    group.addoption("--vdpa-target", default="sim-net", metavar="TARGET",
                    help="device to certify: sim-net[:ATTRS], sim-blk[:ATTRS], python:MODULE:FACTORY[:ATTRS], "
                         "vhost-vdpa:/dev/vhost-vdpa-N (default: sim-net)")
    group.addoption("--vdpa-profile", default="quick", choices=("quick", "full"),
                    help="run profile: how hard to search (default: quick)")
    group.addoption("--vdpa-target-profile", default="auto", metavar="NAME|FILE.toml",
                    help="the target's declared quirks: a built-in profile or a TOML file (default: auto, the "
                         "profile of the target's kind: reference for sim-*/python:, linux-vhost-vdpa for vhost-vdpa:)")
    group.addoption("--vdpa-seed", type=int, default=None, metavar="N",
                    help="seed of the Hypothesis search (default: a random one, shown in the report)")
    group.addoption("--vdpa-examples", type=int, default=None, metavar="N",
                    help="examples per suite machine, overriding the run profile")
    group.addoption("--vdpa-shard", default=None, metavar="I/N",
                    help="run only the I-th of N deterministic slices of the suite (1 <= I <= N), for CI machines")
    group.addoption("--vdpa-report-dir", default=None, metavar="DIR",
                    help="write the report (JSON, JUnit, HTML), per-worker recorder fragments and replay files here")
    group.addoption("--vdpa-db", default=None, metavar="DIR",
                    help="Hypothesis example database directory (shareable; default: no database)")
    group.addoption("--vdpa-on-failure", default="auto", choices=ON_FAILURE,
                    help="what a machine does at a failing check: 'shrink' stops the machine and shrinks the "
                         "example to a minimal sequence; 'continue' files the failure with the steps that found it, "
                         "ends that example and goes on with the next, so one bug does not hide the rest "
                         "(default: auto, continue on a vhost-vdpa: device, whose timing makes shrinking "
                         "unreliable, else shrink)")
    group.addoption("--vdpa-deadline", type=float, default=1800.0, metavar="SECONDS",
                    help="longest a suite machine may run; past it the target is reported as not answering "
                         "(suite.target.alive) and the machine stops (default: 1800; 0: none)")
    group.addoption("--vdpa-suite", action="append", default=None, metavar="MODULE",
                    help="run the suite machines these modules register instead of the built-in suite (repeatable)")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with 1 <= I <= N; ValueError says what is wrong."""
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--vdpa-shard {text!r} is not I/N (like 2/4)") from None
    if not slash or n < 1 or not 1 <= i <= n:
        raise ValueError(f"--vdpa-shard {text!r}: need 1 <= I <= N")
    return i, n


def shard(nodeids: Sequence[str], index: int, count: int) -> list[str]:
    """The node ids slice ``index`` of ``count`` runs: round-robin over the sorted ids.

    Sorting makes it independent of collection order; round-robin keeps the slices within one
    item of each other. The ``count`` slices are disjoint and together hold every id.
    """
    return [nodeid for position, nodeid in enumerate(sorted(nodeids)) if position % count == index - 1]


# ----- per-process state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What the target said about itself: the device id, the feature words it offers, its address spaces."""

    device_id: int
    features: int | None
    backend_features: int | None
    address_spaces: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "features": self.features, "backend_features": self.backend_features,
                "address_spaces": self.address_spaces}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceInfo:
        return cls(int(data["device_id"]), data.get("features"), data.get("backend_features"),
                   data.get("address_spaces"))


def probe(target: Target) -> DeviceInfo:
    """Ask the device its id and offers, then reopen it so the first example starts from a fresh open."""
    client = target.client
    device_id = client.get_device_id()
    features: int | None = None
    backend: int | None = None
    try:
        features = client.get_features()
        backend = client.get_backend_features()
    except OSError:
        try:  # a front that wants an owner first
            client.set_owner()
            features = client.get_features()
            backend = client.get_backend_features()
        except OSError:
            pass
    address_spaces: int | None = None
    with contextlib.suppress(OSError):  # a front without VHOST_VDPA_GET_AS_NUM (before Linux 5.17): not known
        address_spaces = client.get_as_num()
    target.reopen()
    return DeviceInfo(device_id, features, backend, address_spaces)


class ConformanceRun:
    """The options of the run and this process's part of it (see the module docstring)."""

    def __init__(self, config: pytest.Config) -> None:
        from vdpacert.conformance.profiles import ProfileError, run_profile, target_profile
        from vdpacert.conformance.targets import parse_target

        option = config.option
        try:
            parsed = parse_target(option.vdpa_target)
            self.target_name = str(parsed)
            profile = run_profile(option.vdpa_profile)
            if option.vdpa_examples is not None:
                profile = profile.with_examples(option.vdpa_examples)
            self.run_profile: RunProfile = profile
            self.target_profile: TargetProfile = target_profile(option.vdpa_target_profile, kind=parsed.kind)
            self.shard = None if option.vdpa_shard is None else parse_shard(option.vdpa_shard)
            #: Seconds a machine may run before it is stopped as hung (0: no deadline).
            self.deadline: float = float(getattr(option, "vdpa_deadline", 0.0) or 0.0)
            if self.deadline < 0:
                raise ValueError(f"--vdpa-deadline must not be negative, not {self.deadline}")
            on_failure = getattr(option, "vdpa_on_failure", "auto")
            #: File each failing check and go on with the next example (``--vdpa-on-failure continue``),
            #: instead of stopping the machine at its first failure to shrink it.
            self.keeps_going: bool = on_failure == "continue" or (on_failure == "auto" and parsed.kind == "vhost-vdpa")
        except (ValueError, ProfileError) as error:
            raise pytest.UsageError(str(error)) from None
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.worker = "main" if workerinput is None else str(workerinput.get("workerid", "worker"))
        self.is_worker = workerinput is not None
        if workerinput is not None and _SEED in workerinput:
            self.seed: int = int(workerinput[_SEED])
            self.started = datetime.fromisoformat(str(workerinput[_STARTED]))
        else:
            self.seed = option.vdpa_seed if option.vdpa_seed is not None else secrets.randbelow(1 << 32)
            self.started = datetime.now(UTC)
        self.report_dir = None if option.vdpa_report_dir is None else Path(option.vdpa_report_dir).resolve()
        if self.report_dir is not None:  # Hypothesis's own caches go with the run, not into the working directory
            from hypothesis.configuration import set_hypothesis_home_dir

            set_hypothesis_home_dir(self.report_dir / ".hypothesis")
        self.db_dir = None if option.vdpa_db is None else Path(option.vdpa_db).resolve()
        self.suite_modules: tuple[str, ...] | None = None if option.vdpa_suite is None else tuple(
            module.strip() for text in option.vdpa_suite for module in text.split(",") if module.strip())
        self.rootpath = config.rootpath
        self.active = False
        self.device: DeviceInfo | None = None
        self.steps = 0
        #: Called once per machine step (``vdpacert certify`` draws its progress bar with it).
        self.on_step: Callable[[], None] | None = None
        #: What workers sent (on the controller), in arrival order.
        self.payloads: list[dict[str, Any]] = []
        self.report: Report | None = None
        self._recorder: Recorder | None = None
        self._target: Target | None = None
        self._entries: tuple[SuiteEntry, ...] | None = None

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            from vdpacert.conformance.verdicts import Recorder

            self._recorder = Recorder()
        return self._recorder

    def target(self) -> Target:
        """This process's open target (opened on first use, reopened if an example killed it)."""
        if self._target is None:
            from vdpacert.conformance.targets import shared_target

            try:
                self._target = shared_target(self.target_name)
            except (ValueError, OSError) as error:
                raise pytest.UsageError(f"cannot open target {self.target_name}: {error}") from error
            self._target.declared_quirks = frozenset(quirk.name for quirk in self.target_profile.quirks)
            self.device = probe(self._target)
        elif self._target.closed:
            self._target.reopen()
        return self._target

    def entries(self) -> tuple[SuiteEntry, ...]:
        """The suite entries that run on this target's device type."""
        if self._entries is None:
            from vdpacert.conformance import suite

            self.active = True
            try:
                suite.load(self.suite_modules)
            except ImportError as error:
                raise pytest.UsageError(str(error)) from error
            self.target()
            assert self.device is not None
            self._entries = suite.entries_for(self.device.device_id)
        return self._entries

    def note_step(self) -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step()

    def hypothesis_settings(self) -> Settings:
        """The Hypothesis settings of every suite machine: the run profile's sizes, no deadline, one bug."""
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis.database import DirectoryBasedExampleDatabase

        from vdpacert.conformance.targets import parse_target

        database = None if self.db_dir is None else DirectoryBasedExampleDatabase(str(self.db_dir))
        phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
        if self.keeps_going or parse_target(self.target_name).kind == "vhost-vdpa":
            # A real device answers on its kernel thread's time: replaying an example may see it answer
            # differently, so the machine draws differently and a shrink ends in Hypothesis's "flaky"
            # error instead of the failure. Its first failure is reported as found, unshrunk. (Going on
            # past failures, nothing ever fails in Hypothesis's eyes: there is nothing to shrink.)
            phases.remove(Phase.shrink)
        return settings(**self.run_profile.settings_kwargs(), database=database, derandomize=False,
                        report_multiple_bugs=False, print_blob=True, phases=phases,
                        suppress_health_check=(HealthCheck.too_slow, HealthCheck.large_base_example))

    def replay_dir(self) -> Path:
        """Where replay files go: ``<report dir>/replays``, else ``<rootdir>/.vdpacert/replays``."""
        base = self.report_dir if self.report_dir is not None else self.rootpath / ".vdpacert"
        return base / "replays"

    def payload(self) -> dict[str, Any]:
        return {"worker": self.worker, "recorder": self.recorder.to_json(), "steps": self.steps,
                "device": None if self.device is None else self.device.to_json()}

    def close(self) -> None:
        from vdpacert.conformance.targets import close_shared_targets

        close_shared_targets()


_RUN: Final = pytest.StashKey[ConformanceRun]()


def current(config: pytest.Config) -> ConformanceRun:
    """The run of this pytest session; UsageError when the plugin was not loaded."""
    run = config.stash.get(_RUN, None)
    if run is None:
        raise pytest.UsageError("the vdpacert pytest plugin is not loaded: install vdpacert (it registers the "
                                "plugin) or pass -p vdpacert.conformance.plugin")
    return run


def final_report(config: pytest.Config) -> Report | None:
    """The merged report, once the session finished (None: no suite test ran anywhere)."""
    run = config.stash.get(_RUN, None)
    return None if run is None else run.report


# ----- hooks ---------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RUN] = ConformanceRun(config)
    config.addinivalue_line("filterwarnings", f"always::{__name__}.VdpaWarning")


def pytest_report_header(config: pytest.Config) -> str | None:
    """The run's parameters, in a session that asked for the suite (silent in any other session)."""
    run = config.stash.get(_RUN, None)
    asked = any(str(arg).startswith("--vdpa") or "vdpacert.conformance" in str(arg)
                for arg in config.invocation_params.args)
    if run is None or not asked:
        return None
    profile = run.run_profile
    shard_text = "" if run.shard is None else f", shard {run.shard[0]}/{run.shard[1]}"
    return (f"vdpacert: target {run.target_name}, profile {profile.name} ({profile.max_examples} examples x "
            f"{profile.stateful_step_count} steps), target profile {run.target_profile.name}, seed {run.seed}"
            f"{shard_text}{', going on past failures' if run.keeps_going else ''}")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker runs with the controller's seed and start time."""
    run = current(node.config)
    node.workerinput[_SEED] = run.seed
    node.workerinput[_STARTED] = run.started.isoformat()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    run = current(config)
    ours = [item for item in items if ENTRY_FIXTURE in getattr(item, "fixturenames", ())]
    if not ours:
        return
    run.active = True
    if run.shard is None:
        return
    keep = set(shard([item.nodeid for item in ours], *run.shard))
    dropped = [item for item in ours if item.nodeid not in keep]
    if dropped:
        items[:] = [item for item in items if item not in dropped]
        config.hook.pytest_deselected(items=dropped)


@pytest.fixture(scope="session")
def vdpa_run(request: pytest.FixtureRequest) -> ConformanceRun:
    """This process's :class:`ConformanceRun` (its target is closed at the end of the session)."""
    run = current(request.config)
    request.addfinalizer(run.close)
    return run


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: a worker finished; keep what it recorded."""
    text = getattr(node, "workeroutput", {}).get(_PAYLOAD)
    if text:
        current(node.config).payloads.append(json.loads(text))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    run = current(config)
    if config.option.collectonly:
        return
    if run.is_worker:
        if run.active:
            text = json.dumps(run.payload())
            config.workeroutput[_PAYLOAD] = text  # type: ignore[attr-defined]  # set by xdist on workers
            _write_fragment(run, text)
        return
    if run.active:
        text = json.dumps(run.payload())
        run.payloads.append(json.loads(text))
        _write_fragment(run, text)
    if not run.payloads:
        return
    run.report = _build_report(run)
    if run.report_dir is not None:
        from vdpacert.conformance.report import write_html, write_json, write_junit

        write_json(run.report, run.report_dir / "report.json")
        write_junit(run.report, run.report_dir / "junit.xml")
        write_html(run.report, run.report_dir / "report.html")


def _write_fragment(run: ConformanceRun, text: str) -> None:
    if run.report_dir is not None:
        run.report_dir.mkdir(parents=True, exist_ok=True)
        (run.report_dir / f"recorder-{run.worker}.json").write_text(text + "\n", encoding="utf-8")


def _build_report(run: ConformanceRun) -> Report:
    from vdpacert.conformance.report import RunInfo, build_report
    from vdpacert.conformance.verdicts import Recorder

    recorder = Recorder.combine(Recorder.from_json(payload["recorder"]) for payload in run.payloads)
    devices = [DeviceInfo.from_json(p["device"]) for p in run.payloads if p.get("device")]
    device = devices[0] if devices else None
    if device is None:  # no process got as far as opening the target: ask it here, for applicability
        try:
            from vdpacert.conformance.targets import close_shared_targets, shared_target

            try:
                device = probe(shared_target(run.target_name))
            finally:
                close_shared_targets()
        except Exception as error:  # the report is still written, with every clause not exercised
            print(f"vdpacert: cannot open {run.target_name} to learn its device: {error}", file=sys.stderr)
    info = RunInfo(run.target_name, run.run_profile.name, run.target_profile.name, run.seed, run.started,
                   datetime.now(UTC), None if device is None else device.device_id,
                   None if device is None else device.features, None if device is None else device.backend_features,
                   address_spaces=None if device is None else device.address_spaces)
    return build_report(recorder, info, run.target_profile)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(_RUN, None)
    if run is None or run.report is None:
        return
    from vdpacert.conformance.report import text_failures, text_table
    from vdpacert.conformance.verdicts import Verdict

    report = run.report
    terminalreporter.section("vdpacert")
    terminalreporter.write_line(f"target {run.target_name}, profile {run.run_profile.name}, "
                                f"target profile {run.target_profile.name}, seed {run.seed}")
    terminalreporter.write(text_table(report, show=(Verdict.FAIL, Verdict.WARN, Verdict.QUIRK)))
    failures = text_failures(report)
    if failures:
        terminalreporter.write("\n" + failures)
    if run.report_dir is not None:
        terminalreporter.write_line(f"reports in {run.report_dir}")


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(_RUN, None)
    if run is not None:
        run.close()
