"""``vdpacert bench datapath``: throughput of the reference datapath, with its baselines.

Prints one row per workload, ring layout and batch size: descriptors/s and GB/s of the
compiled device, the same ring walk in pure Python, and memcpy of the same bytes, each as
measured in this run. ``--json F`` writes the rows for tracking over time.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks of the reference implementation")
    actions = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    datapath = actions.add_parser("datapath", help="sim-net loopback and sim-blk reads, split and packed")
    datapath.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    datapath.add_argument("--seconds", type=float, default=0.25,
                          help="timed seconds per figure (default 0.25; more gives steadier figures)")
    datapath.add_argument("--batch", type=int, action="append",
                          help="chains offered per kick (repeatable; default 1 and 32)")
    datapath.set_defaults(handler=run_datapath)


def run_datapath(args: argparse.Namespace) -> int:
    from vdpacert.bench import datapath

    if args.seconds <= 0:
        print("vdpacert bench datapath: --seconds must be positive", file=sys.stderr)
        return 2
    batches = tuple(args.batch) if args.batch else (1, 32)
    if any(not 1 <= b <= 128 for b in batches):
        print("vdpacert bench datapath: --batch must be in 1..128 (the ring holds 256 entries)", file=sys.stderr)
        return 2
    header = (f"{'workload':<14} {'ring':<6} {'batch':>5} {'desc/s':>12} {'GB/s':>7} {'python desc/s':>14} "
              f"{'x python':>9} {'memcpy GB/s':>12} {'% memcpy':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for row in datapath.run(args.seconds, batches=batches,
                            progress=lambda what: print(f"  measuring {what} ...", file=sys.stderr, flush=True)):
        rows.append(row)
        print(f"{row.workload:<14} {row.ring:<6} {row.batch:>5} {row.desc_per_s:>12,.0f} {row.gbytes_per_s:>7.2f} "
              f"{row.python_desc_per_s:>14,.0f} {row.speedup:>9.0f} {row.memcpy_gbytes_per_s:>12.2f} "
              f"{100 * row.memcpy_fraction:>8.0f}%", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([row.as_json() for row in rows], out, indent=2)
            out.write("\n")
    return 0
