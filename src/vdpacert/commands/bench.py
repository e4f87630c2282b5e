"""``vdpacert bench``: benchmarks of the reference implementation, with their baselines.

``datapath`` prints one row per workload, ring layout and batch size: descriptors/s and GB/s of
the compiled device, the same ring walk in pure Python, and memcpy of the same bytes, each as
measured in this run. ``migration`` prints what dirty tracking costs a guest's datapath (log on
vs off, shadow virtqueues vs direct, as ratios) and the log-sync scan rate (see
:mod:`vdpacert.bench.migration`). ``--json F`` writes the rows for tracking over time.
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
    migration = actions.add_parser("migration", help="dirty log on vs off, shadow virtqueues vs direct, "
                                                     "log-sync scan rate")
    migration.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    migration.add_argument("--seconds", type=float, default=0.5,
                           help="timed seconds per mode and workload (default 0.5; more gives steadier figures)")
    migration.add_argument("--scan-guest-gib", type=int, default=1024, metavar="GIB",
                           help="guest size the log-sync scan covers, in GiB (default 1024: 1 TiB, a 32 MiB log)")
    migration.set_defaults(handler=run_migration)


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


#: Most guest the scan may cover: its bitmaps and the memcpy baseline hold five copies of the log (128 MiB here).
MAX_SCAN_GIB = 4096


def run_migration(args: argparse.Namespace) -> int:
    from vdpacert.bench import migration

    if not args.seconds > 0:
        print("vdpacert bench migration: --seconds must be positive", file=sys.stderr)
        return 2
    if not 1 <= args.scan_guest_gib <= MAX_SCAN_GIB:
        print(f"vdpacert bench migration: --scan-guest-gib must be in 1..{MAX_SCAN_GIB}", file=sys.stderr)
        return 2

    def progress(what: str) -> None:
        print(f"  {what} ...", file=sys.stderr, flush=True)

    print("# Dirty tracking on the datapath: operations/s of a guest whose virtio driver is Python (the conformance\n"
          "# DriverSession), so absolute rates are Python-bound; the ratios, measured in the same run with the modes\n"
          "# taking turns, are the figures. direct = dirty log off; log on = VHOST_F_LOG_ALL + SET_LOG_BASE, rings\n"
          "# with VHOST_VRING_F_LOG; shadow = every queue through a shadow virtqueue. Each mode's dirty source is\n"
          f"# synced every {migration.SYNC_EVERY} operations (frames, or blk writes), between the timed slices.")
    print(migration.DATAPATH_HEADER)
    print("-" * len(migration.DATAPATH_HEADER), flush=True)
    datapath = []
    for row in migration.run_datapath(args.seconds, progress=lambda what: progress(f"measuring {what}")):
        datapath.append(row)
        print(row.row(), flush=True)
    guest_bytes = args.scan_guest_gib * migration.GIB
    print(f"\n# Log sync (merge_from_log + take) of a {args.scan_guest_gib} GiB guest at 1 % dirty, best of 5; "
          "GiB/s: guest memory\n# covered per second of syncing; x memcpy: the sync against one memcpy of the log.")
    print(migration.SCAN_HEADER)
    print("-" * len(migration.SCAN_HEADER), flush=True)
    scan = migration.scan_rate(guest_bytes, progress=lambda what: progress(f"log-sync scan: {what}"))
    print(scan.row(), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"datapath": [row.as_json() for row in datapath], "scan": [scan.as_json()]}, out, indent=2)
            out.write("\n")
    return 0
