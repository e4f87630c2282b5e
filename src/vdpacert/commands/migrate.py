"""``vdpacert migrate SCENARIO...``: run migration scenarios and say whether each kept every byte.

A SCENARIO is a TOML file (docs/scenarios.md), or the name of a shipped one (``vdpacert migrate
--list`` shows them; ``all`` runs every one; ``linux/NAME`` ones need a guest kernel with Linux's vdpa_sim,
see ``vdpacert kernel``). Progress goes to stderr while a scenario runs; the
summary table to stdout: iterations, bytes sent, simulated total time and downtime, converged or
not, the verification verdict, and PASS when the scenario's expectation was met with nothing lost.
``--json F`` writes one object per scenario (the issue's fields first); ``--plot F.png`` draws dirty
pages per iteration and the downtime of every scenario run.

Exit status: 0 every scenario passed, 1 one failed, 2 bad usage (an unreadable or invalid scenario).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdpacert.migration.orchestrator import MigrationResult
    from vdpacert.migration.scenario import Scenario


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("migrate", help="run live-migration scenarios (pre-copy, verified)")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help="scenario TOML files or names of shipped scenarios ('all': every shipped one)")
    parser.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    parser.add_argument("--json", metavar="FILE", help="write the results as a JSON list to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw dirty pages per iteration and downtime to FILE.png")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(handler=run)


def _resolve(names: list[str]) -> list[Scenario]:
    from vdpacert.migration.scenario import load_scenario, packaged_scenario, shipped_scenarios

    out = []
    for name in names:
        if name == "all":
            out += [load_scenario(path) for path in shipped_scenarios()]
            continue
        packaged = packaged_scenario(name)
        out.append(load_scenario(packaged if packaged is not None else Path(name)))
    return out


def run(args: argparse.Namespace) -> int:
    from vdpacert.migration.orchestrator import Migration
    from vdpacert.migration.scenario import ScenarioError, shipped_scenarios

    if args.list:
        from vdpacert.migration.scenario import linux_scenarios, load_scenario

        for path in shipped_scenarios():
            scenario = load_scenario(path)
            print(f"{path.stem:<34} {scenario.description}")
        for path in linux_scenarios():
            scenario = load_scenario(path)
            print(f"{'linux/' + path.stem:<34} {scenario.description} (in a guest kernel: vdpacert kernel run)")
        return 0
    if not args.scenarios:
        print("vdpacert migrate: name at least one scenario (or 'all'; --list shows them)", file=sys.stderr)
        return 2
    try:
        scenarios = _resolve(args.scenarios)
    except (ScenarioError, OSError) as error:
        print(f"vdpacert migrate: {error}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"  {line}", file=sys.stderr, flush=True)

    results = []
    header = (f"{'scenario':<34} {'iter':>4} {'MiB sent':>9} {'total ms':>9} {'downtime ms':>11} "
              f"{'converged':>9} {'verified':>8}  result")
    print(header)
    print("-" * len(header))
    for scenario in scenarios:
        result = Migration(scenario, progress=progress).run()
        results.append(result)
        _print_row(result)
        for line in result.problems:
            print(f"    problem: {line}")
        if result.error and not args.quiet:
            print(f"    migration error: {result.error}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([r.to_json() for r in results], out, indent=2)
            out.write("\n")
    if args.plot:
        _plot(args.plot, results, scenarios)
    failed = [r.scenario for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _print_row(result: MigrationResult) -> None:
    verdict = "PASS" if result.passed else f"FAIL (expected {result.expect}, got {result.outcome})"
    if result.outcome == result.expect and not result.verified:
        verdict = "FAIL (verification)"
    print(f"{result.scenario:<34} {result.iterations:>4} {result.bytes_sent / (1 << 20):>9.1f} "
          f"{1000 * result.total_s:>9.1f} {1000 * result.downtime_s:>11.2f} {result.converged!s:>9} "
          f"{result.verified!s:>8}  {verdict}", flush=True)


def _plot(path: str, results: list[MigrationResult], scenarios: list[Scenario]) -> None:
    from vdpacert.migration.plot import plot_many

    runs = []
    for result, scenario in zip(results, scenarios, strict=True):
        precopy = [i for i in result.history if i.number]
        final = [i for i in result.history if not i.number]
        runs.append(dict(title=result.scenario,
                         dirty_pages=[i.pages_sent for i in precopy] + [i.pages_sent for i in final],
                         sent_bytes=[i.bytes_sent for i in precopy] + [i.bytes_sent for i in final],
                         downtime_s=result.downtime_s, downtime_target_s=scenario.migration.downtime_ms / 1000,
                         converged=result.converged, error=result.error or "", stop_and_copy=bool(final)))
    plot_many(path, runs)
