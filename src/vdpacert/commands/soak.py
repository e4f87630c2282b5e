"""``vdpacert soak``: minutes of random traffic, resets, suspends, IOTLB changes and migrations on one target.

The engine is :mod:`vdpacert.migration.soak`. The summary goes to stdout (operations of each kind,
frames and blk requests verified, migrations, RSS start / end / peak and the second-half slope);
``--json`` writes it as JSON too. Exit status: 0 when everything checked out and memory stayed flat,
1 on a broken check or a leak (second-half RSS growth above ``--leak-mib``), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_soak"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "soak", help="random traffic, resets, suspends, IOTLB changes and migrations for M minutes; RSS held flat",
        description="Soak a target: seeded random traffic with resets, suspends, IOTLB changes and live migrations, "
                    "every frame and sector verified, RSS sampled. Exit 1 on a broken check or a memory leak.")
    parser.add_argument("--target", default="sim-net", help="sim-net[:ATTRS], sim-blk[:ATTRS] or "
                        "python:MODULE:FACTORY[:ATTRS] (default: sim-net)")
    parser.add_argument("--minutes", type=float, required=True, help="how long to run (fractional allowed)")
    parser.add_argument("--seed", type=int, help="seed of the operation sequence (default: random, shown)")
    parser.add_argument("--json", metavar="FILE", help="write the summary as JSON to FILE")
    parser.add_argument("--leak-mib", type=float, default=16.0,
                        help="RSS growth over the second half of the run that counts as a leak (default: 16)")
    parser.add_argument("--sample-seconds", type=float, help="RSS sampling period (default: the run / 60, 1-10 s)")
    parser.add_argument("--mode", choices=("device-log", "shadow"), default="device-log",
                        help="how migrations find the device's dirty pages (default: device-log)")
    parser.set_defaults(handler=run_soak)


def run_soak(args: argparse.Namespace) -> int:
    from vdpacert.migration.soak import Soak, SoakConfig
    from vdpacert.migration.vmm import DirtyMode

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    sample = args.sample_seconds or min(10.0, max(1.0, args.minutes))  # about 60 samples, 1 to 10 s apart
    try:
        config = SoakConfig(args.target, args.minutes, seed=seed, leak_mib=args.leak_mib, sample_s=sample,
                            mode=DirtyMode(args.mode))
        soak = Soak(config)
    except ValueError as error:
        print(f"vdpacert soak: {error}", file=sys.stderr)
        return 2
    result = soak.run()
    print(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0 if result.passed else 1
