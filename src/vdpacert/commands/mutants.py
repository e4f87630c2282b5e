"""``vdpacert mutants``: run the quick profile against every seeded-bug mutant and print the kill table.

Each mutant of the zoo (:mod:`vdpacert.conformance.mutants.registry`) is certified in its own
subprocess (see :mod:`vdpacert.conformance.mutants.killtable`); ``-n N`` runs N of them at once.
The table names, per mutant, whether the suite killed it, the MUST clauses that failed, the
seconds the run took and whether the mutant's clause hint was among them.

Exit status: 0 only when every mutant was killed; 1 when one survived; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "mutants", help="run the quick profile on every seeded-bug mutant and print the kill table",
        description="Certify every seeded-bug mutant with the quick profile (one subprocess each) and print the "
                    "kill table: killed or not, the failing clauses, seconds to a verdict. Exit 0 only when every "
                    "mutant is killed.")
    parser.add_argument("--json", metavar="FILE", help="write the kill table as JSON here")
    parser.add_argument("--seed", type=int, help="seed of every run (default: random, shown with the totals)")
    parser.add_argument("-n", "--jobs", type=int, default=1, metavar="N", help="mutants certified at once (default 1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these mutants (default: the whole zoo)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="seconds one mutant's run may take before it counts as not killed (default 120)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from vdpacert.conformance.mutants.killtable import DEFAULT_TIMEOUT, KillRow, run_table, text_table
    from vdpacert.conformance.mutants.registry import MUTANTS

    names = list(dict.fromkeys(args.only)) if args.only else list(MUTANTS)
    unknown = [name for name in names if name not in MUTANTS]
    if unknown:
        print(f"vdpacert mutants: no mutant {', '.join(unknown)}; known: {', '.join(MUTANTS)}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"vdpacert mutants: -n {args.jobs}: give at least 1", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT
    finished = 0

    def progress(row: KillRow) -> None:
        nonlocal finished
        finished += 1
        outcome = "killed" if row.killed else f"NOT killed: {row.reason}"
        print(f"vdpacert: [{finished}/{len(names)}] {row.mutant}: {outcome} ({row.seconds:.1f} s)",
              file=sys.stderr, flush=True)

    print(f"vdpacert: certifying {len(names)} mutants with the quick profile, seed {seed}, {args.jobs} at a time",
          file=sys.stderr, flush=True)
    table = run_table(names, seed, jobs=args.jobs, timeout=timeout, on_row=progress)
    print(text_table(table), end="")
    if args.json:
        table.write_json(args.json)
        print(f"wrote {args.json}")
    return 0 if table.all_killed else 1
