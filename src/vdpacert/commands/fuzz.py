"""``vdpacert fuzz [NAME ...|all]``: run the structure-aware fuzzers, bounded in time or executions.

Each fuzzer runs in turn under the chosen engine (docs/fuzzing.md): ``atheris`` (coverage-guided,
libFuzzer, a subprocess), ``mutate`` (seeded, in-process, no dependency) or ``auto`` (atheris when it
imports and libasan is not preloaded). ``--seconds`` and ``--runs`` bound each fuzzer (either or
both; neither means 10 seconds each). The table gives executions and executions per second per
fuzzer and the total; ``--json F`` writes the same as JSON. A run stops at its first failing input,
which is written under ``--workdir`` and printed with the command that reproduces it:
``vdpacert fuzz NAME --reproduce FILE`` runs that one input again.

Exit status: 0 no crash and no broken invariant, 1 one or more, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_SECONDS = 10.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("fuzz", help="run the structure-aware fuzzers (rings, IOTLB, ioctls, state blobs)")
    parser.add_argument("names", nargs="*", metavar="NAME", help="fuzzers to run ('all', the default: every one)")
    parser.add_argument("--seconds", type=float, help=f"fuzzing time per fuzzer (default {DEFAULT_SECONDS:g} "
                                                      "when --runs is not given either)")
    parser.add_argument("--runs", type=int, help="executions per fuzzer")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto",
                        help="atheris (coverage-guided), mutate (seeded, in-process) or auto (default)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): a run is repeatable")
    parser.add_argument("--workdir", metavar="DIR", help="where failing inputs and atheris's corpus go "
                                                         "(default: a new temporary directory)")
    parser.add_argument("--json", metavar="FILE", help="write the statistics as JSON to FILE")
    parser.add_argument("--reproduce", metavar="FILE", help="run the input in FILE once through NAME and report")
    parser.set_defaults(handler=run)


def _names(wanted: list[str]) -> list[str]:
    from vdpacert.fuzz.engine import FUZZER_MODULES, UnknownFuzzer, available

    if not wanted or wanted == ["all"]:
        present = available()
        for name in FUZZER_MODULES:
            if name not in present:
                print(f"vdpacert fuzz: {name}: module {FUZZER_MODULES[name]} is not present, not run", file=sys.stderr)
        return present
    for name in wanted:
        if name not in FUZZER_MODULES:
            raise UnknownFuzzer(name)
    return list(dict.fromkeys(wanted))


def _reproduce(args: argparse.Namespace) -> int:
    from vdpacert.fuzz.engine import reproduce

    if len(args.names) != 1 or args.names == ["all"]:
        print("vdpacert fuzz: --reproduce takes exactly one fuzzer NAME", file=sys.stderr)
        return 2
    try:
        data = Path(args.reproduce).read_bytes()
    except OSError as error:
        print(f"vdpacert fuzz: {error}", file=sys.stderr)
        return 2
    crash = reproduce(args.names[0], data)
    if crash is None:
        print(f"{args.names[0]}: {len(data)}-byte input ran clean (every invariant held)")
        return 0
    print(f"{args.names[0]}: {crash.kind}: {crash.message}")
    return 1


def run(args: argparse.Namespace) -> int:
    from vdpacert.fuzz.engine import FuzzError, UnknownFuzzer, resolve_engine
    from vdpacert.fuzz.engine import run as fuzz

    try:
        names = _names(args.names)
    except UnknownFuzzer as error:
        print(f"vdpacert fuzz: {error.args[0]}", file=sys.stderr)
        return 2
    if args.reproduce:
        return _reproduce(args)
    if (args.seconds is not None and args.seconds <= 0) or (args.runs is not None and args.runs <= 0):
        print("vdpacert fuzz: --seconds and --runs must be positive", file=sys.stderr)
        return 2
    seconds = DEFAULT_SECONDS if args.seconds is None and args.runs is None else args.seconds
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vdpacert-fuzz-"))
    engine = resolve_engine(args.engine)
    header = f"{'fuzzer':<10} {'engine':<8} {'executions':>12} {'exec/s':>9} {'seconds':>8} {'crashes':>7}"
    print(header)
    print("-" * len(header))
    results = []
    for name in names:
        try:
            stats = fuzz(name, engine=engine, seconds=seconds, runs=args.runs, seed=args.seed, workdir=workdir)
        except FuzzError as error:
            print(f"vdpacert fuzz: {name}: {error}", file=sys.stderr)
            return 2
        results.append(stats)
        print(f"{stats.name:<10} {stats.engine:<8} {stats.executions:>12,} {stats.exec_per_second:>9,.0f} "
              f"{stats.seconds:>8.1f} {len(stats.crashes):>7}", flush=True)
    total = sum(stats.executions for stats in results)
    print("-" * len(header))
    print(f"{'total':<19} {total:>12,}")
    crashes = [crash for stats in results for crash in stats.crashes]
    for crash in crashes:
        print(f"\n{crash.fuzzer}: {crash.kind}: {crash.message}\n  input: {crash.input_path}\n"
              f"  reproduce: {crash.reproducer}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"workdir": str(workdir), "total_executions": total,
                       "fuzzers": [stats.to_json() for stats in results]}, out, indent=2)
            out.write("\n")
    print(f"work directory: {workdir}")
    return 1 if crashes else 0
