"""``vdpacert certify``: run the conformance suite on a target; ``vdpacert replay``: re-run one failure.

``certify`` is pytest underneath (in-process ``pytest.main`` over the suite module with the
vdpacert plugin; ``-n N`` is pytest-xdist), so a certification and a CI job running
``pytest --pyargs vdpacert.conformance`` are the same run. pytest's own output is kept out of the
way (shown when pytest itself fails, or with ``--verbose``); the command shows a progress bar
while the suite runs, then the per-clause verdict table, each failure with its minimal step
sequence and replay command, and writes the reports asked for.

Exit status: 0 when no MUST clause failed; 1 when one did (or a suite machine crashed, which
is never taken for a pass); 2 for bad usage or a run that could not be made.

``replay F`` re-runs the steps of a replay file against a fresh target: exit 1 when the target
still fails, 0 when it no longer does, 2 when the file cannot be replayed here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker

if TYPE_CHECKING:
    import pytest

    from vdpacert.conformance.progress import Progress
    from vdpacert.conformance.report import Report

__all__ = ["pytest_args", "register", "run_certify", "run_replay"]

#: pytest's hook marker, without importing pytest for every vdpacert command.
hookimpl = HookimplMarker("pytest")
#: pytest exit codes (pytest.ExitCode) this command tells apart.
_TESTS_FAILED, _NO_TESTS = 1, 5


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "certify", help="run the conformance suite on a target and report a verdict per clause",
        description="Run the conformance suite on a target: a progress bar, the per-clause verdict table, every "
                    "failure with its minimal sequence and replay file. Exit 0 only when no MUST clause failed.")
    parser.add_argument("--target", default="sim-net",
                        help="sim-net[:ATTRS], sim-blk[:ATTRS], python:MODULE:FACTORY[:ATTRS] or "
                             "vhost-vdpa:/dev/vhost-vdpa-N (default: sim-net)")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick", help="run profile (default: quick)")
    parser.add_argument("--target-profile", default="auto", metavar="NAME|FILE.toml",
                        help="the target's declared quirks: strict, reference, linux-vhost-vdpa, linux-vdpa-sim or a "
                             "TOML file (default: auto, the profile of the target's kind)")
    parser.add_argument("--json", metavar="FILE", help="write the JSON report here")
    parser.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here (one testcase per clause)")
    parser.add_argument("--html", metavar="FILE", help="write an HTML report here")
    parser.add_argument("-n", "--numprocesses", default="0", metavar="N",
                        help="pytest-xdist workers, each on its own device (a number or 'auto'; default 0: in-process)")
    parser.add_argument("--seed", type=int, help="seed of the search (default: random, shown in the report)")
    parser.add_argument("--examples", type=int, metavar="N", help="examples per suite machine (overrides the profile)")
    parser.add_argument("--report-dir", default="vdpacert-report", metavar="DIR",
                        help="where the run leaves its reports, worker fragments and replay files "
                             "(default: ./vdpacert-report)")
    parser.add_argument("--on-failure", choices=("auto", "shrink", "continue"), default="auto",
                        help="at a failing check: shrink it and stop that machine, or file it and go on with the "
                             "next example (default: auto, continue on a vhost-vdpa: device, else shrink)")
    parser.add_argument("--deadline", type=float, default=1800.0, metavar="SECONDS",
                        help="longest a suite machine may run before the target is reported as hung (default: "
                             "1800; 0: none)")
    parser.add_argument("--db", metavar="DIR", help="Hypothesis example database directory (shareable)")
    parser.add_argument("--shard", metavar="I/N", help="run only slice I of N of the suite (CI machines)")
    parser.add_argument("--suite", action="append", metavar="MODULE",
                        help="run the machines these modules register instead of the built-in suite (repeatable)")
    parser.add_argument("--all", action="store_true", help="list not-applicable clauses in the table too")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's own output")
    parser.set_defaults(handler=run_certify)

    replay = subparsers.add_parser(
        "replay", help="re-run a failure's replay file against a fresh target",
        description="Re-run the minimal step sequence of a replay file. Exit 1 when the target still fails, "
                    "0 when it no longer does.")
    replay.add_argument("file", help="a replay file written by a failing run")
    replay.add_argument("--target", help="replay against this target instead of the file's")
    replay.set_defaults(handler=run_replay)


def pytest_args(args: argparse.Namespace, report_dir: Path) -> list[str]:
    """The pytest command line of a certification run (pytest's own config files are ignored)."""
    import vdpacert.conformance

    package_dir = Path(vdpacert.conformance.__file__).resolve().parent
    argv = [
        "-c", os.devnull, "--rootdir", str(report_dir), "--confcutdir", str(package_dir),
        # The entry point may be installed too: block it by name so the module registers once.
        "-p", "no:vdpacert", "-p", "vdpacert.conformance.plugin", "-p", "no:cacheprovider",
        "--pyargs", "vdpacert.conformance.test_conformance",
        "--capture=sys", "-q", "-W", "ignore::pytest.PytestAssertRewriteWarning",
        "--vdpa-target", args.target, "--vdpa-profile", args.profile,
        "--vdpa-target-profile", args.target_profile, "--vdpa-report-dir", str(report_dir),
        "--vdpa-on-failure", args.on_failure, "--vdpa-deadline", str(args.deadline),
    ]
    if args.seed is not None:
        argv += ["--vdpa-seed", str(args.seed)]
    if args.examples is not None:
        argv += ["--vdpa-examples", str(args.examples)]
    if args.db is not None:
        argv += ["--vdpa-db", args.db]
    if args.shard is not None:
        argv += ["--vdpa-shard", args.shard]
    for module in args.suite or ():
        argv += ["--vdpa-suite", module]
    if args.numprocesses not in ("0", ""):
        argv += ["-n", args.numprocesses]
    return argv


class _Watch:
    """A pytest plugin object: feeds the progress bar and keeps the final report."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.report: Report | None = None
        self.config: pytest.Config | None = None
        self.started = False

    @hookimpl(trylast=True)  # after the vdpacert plugin made the run
    def pytest_configure(self, config: pytest.Config) -> None:
        from vdpacert.conformance import plugin

        self.config = config
        plugin.current(config).on_step = self.progress.step

    def _start(self, total: int) -> None:
        if not self.started:
            self.started = True
            self.progress.start(total)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._start(len(session.items))

    @hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self._start(len(ids))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            name = report.nodeid.rpartition("[")[2].rstrip("]") if "[" in report.nodeid else report.nodeid
            # In-process runs count steps live; an xdist controller learns them from the worker's report.
            distributed = self.config is not None and self.config.pluginmanager.has_plugin("dsession")
            steps = dict(report.user_properties).get("vdpacert_steps")
            self.progress.test_done(name, report.outcome, steps if distributed and isinstance(steps, int) else None)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        from vdpacert.conformance import plugin

        self.report = plugin.final_report(config)


def _check_usage(args: argparse.Namespace) -> str | None:
    """The problem with the arguments, before any pytest start-up (None: fine)."""
    from vdpacert.conformance.profiles import ProfileError, target_profile
    from vdpacert.conformance.targets import parse_target

    try:
        target_profile(args.target_profile, kind=parse_target(args.target).kind)
    except (ValueError, ProfileError) as error:
        return str(error)
    if args.numprocesses not in ("0", "auto", "logical") and not args.numprocesses.isdigit():
        return f"-n {args.numprocesses!r}: give a number of workers or 'auto'"
    if parse_target(args.target).kind == "vhost-vdpa" and args.numprocesses not in ("0", "1"):
        return (f"-n {args.numprocesses}: a vhost-vdpa device has one opener at a time, so its run cannot be "
                "shared by workers; use -n 0 (or one certify run per device)")
    return None


def run_certify(args: argparse.Namespace) -> int:
    import pytest

    from vdpacert.conformance.progress import Progress
    from vdpacert.conformance.report import text_failures, text_table, write_html, write_json, write_junit
    from vdpacert.conformance.verdicts import Verdict

    problem = _check_usage(args)
    if problem is not None:
        print(f"vdpacert certify: {problem}", file=sys.stderr)
        return 2
    report_dir = Path(args.report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(sys.stderr)
    watch = _Watch(progress)
    output = io.StringIO()
    with contextlib.ExitStack() as stack:
        if not args.verbose:
            stack.enter_context(contextlib.redirect_stdout(output))
        status = int(pytest.main(pytest_args(args, report_dir), plugins=[watch]))
    progress.finish()
    report = watch.report
    if report is None or status not in (0, _TESTS_FAILED, _NO_TESTS):
        sys.stderr.write(output.getvalue())
        print(f"vdpacert certify: the suite did not run (pytest exit status {status})", file=sys.stderr)
        return 2
    shown = None if args.all else [v for v in Verdict if v is not Verdict.NOT_APPLICABLE]
    print(text_table(report, show=shown), end="")
    failures = text_failures(report)
    if failures:
        print("\n" + failures, end="")
    for path, write in ((args.json, write_json), (args.junit, write_junit), (args.html, write_html)):
        if path:
            write(report, path)
            print(f"wrote {path}")
    if status == _NO_TESTS:
        print(f"vdpacert certify: no suite machine runs on {report.run.target}", file=sys.stderr)
    if report.exit_status:
        return 1
    if status == _TESTS_FAILED:  # a machine crashed: show why, and never call it a pass
        sys.stderr.write(output.getvalue())
        print("vdpacert certify: a suite machine crashed (see pytest's output above)", file=sys.stderr)
        return 1
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from vdpacert.conformance.replay import ReplayError, ReplayFile, replay

    try:
        recorded = ReplayFile.read(args.file)
        print(f"replaying {len(recorded.steps)} steps of {recorded.entry} on {args.target or recorded.target} "
              f"(recorded failure: {recorded.clause})")
        outcome = replay(recorded, target=args.target)
    except ReplayError as error:
        print(f"vdpacert replay: {error}", file=sys.stderr)
        return 2
    if not outcome.failed:
        print(f"no longer fails: all {outcome.steps_run} steps passed")
        return 0
    if outcome.reproduced:
        print(f"reproduced: {outcome.clause} failed at step {outcome.steps_run}: {outcome.message}")
    else:
        print(f"fails differently: {outcome.clause or 'a crash'} at step {outcome.steps_run} "
              f"(recorded: {outcome.expected_clause}): {outcome.message}")
    return 1
