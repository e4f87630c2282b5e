"""``vdpacert rules``: list every rule the model encodes, with its level and citation.

The catalog is what reports and target quirks refer to by id; listing it lets a vendor see
exactly which sentences of the spec (or of Linux, where the spec is silent) a run can hold
their device to.
"""

from __future__ import annotations

import argparse
from typing import Any

from vdpacert.model import rules


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("rules", help="list the rules the model encodes")
    parser.add_argument("filter", nargs="?", default="",
                        help="only rules whose id or citation contains this text (case-insensitive)")
    parser.add_argument("--level", choices=("MUST", "SHOULD", "MAY"), help="only rules of this level")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    wanted = args.filter.lower()
    shown = 0
    for entry in rules.catalog():
        level = "MAY" if entry.level is None else str(entry.level)
        if args.level and level != args.level:
            continue
        if wanted and wanted not in entry.rule.lower() and wanted not in str(entry.citation).lower():
            continue
        print(f"{level:<6} {entry.rule:<52} {entry.citation}")
        print(f"       {entry.summary}")
        shown += 1
    print(f"{shown} rule(s)")
    return 0
