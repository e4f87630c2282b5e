"""``vdpacert kernel prepare`` / ``vdpacert kernel run -- COMMAND``: a real Linux vDPA target in one command.

``prepare`` fills a cache (``--cache DIR``, else ``$VDPACERT_KERNEL_CACHE``, else
``~/.cache/vdpacert/kernel``) with Debian's 6.12 kernel, the out-of-tree vdpa_sim modules and a
busybox initramfs, printing each step and its time; run again, it does nothing and says so.
``run`` boots that kernel in QEMU with the host's root shared read-only, adds the vdpa devices
asked for (``--dev vdpa0:vdpasim_net:mac=02:00:00:00:00:01``; the command finds their
``/dev/vhost-vdpa-N`` in ``$VDPACERT_VHOST_VDPA``), runs the command and streams its output.

Exit status of ``run``: the command's own; 124 when the guest timed out; 125 when the harness
itself failed (not prepared, boot failure, a setup step in the guest); 2 for bad usage.
Exit status of ``prepare``: 0 done, 1 a step failed or a prerequisite is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: The exit statuses ``run`` uses for its own failures, as timeout(1) does.
EXIT_TIMEOUT = 124
EXIT_HARNESS = 125


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("kernel", help="run commands on a real Linux 6.12 with vdpa_sim, in QEMU")
    actions = parser.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)

    prepare = actions.add_parser("prepare", help="download Debian's 6.12 kernel, build vdpa_sim and an initramfs")
    _cache_option(prepare)
    prepare.add_argument("--refresh", action="store_true",
                         help="run apt-get update and prepare a newer 6.12 if apt offers one")
    prepare.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                         help="accelerator to record (default auto: probe whether KVM really runs the kernel)")
    prepare.set_defaults(handler=run_prepare)

    run = actions.add_parser(
        "run", help="boot the prepared kernel and run COMMAND in the host's root (read-only)",
        description="Boot the prepared kernel, create vdpa devices, run COMMAND (after --) in the host's "
                    "root mounted read-only (writable: /tmp, HOME=/tmp/vdpacert-home, /run, /var/tmp), "
                    "and exit with its status. PATH is the host's without pyenv shims: call python by "
                    "its real path (e.g. /tmp/v0/bin/python).")
    _cache_option(run)
    run.add_argument("--dev", action="append", default=[], metavar="NAME:MGMTDEV[:attr=value,...]",
                     help="add a vdpa device before the command, e.g. vdpa0:vdpasim_net:mac=02:00:00:00:00:01 "
                          "or blk0:vdpasim_blk (repeatable)")
    run.add_argument("--memory", type=int, default=2048, metavar="MiB", help="guest memory (default 2048)")
    run.add_argument("--cpus", type=int, default=None, metavar="N", help="guest CPUs (default: up to 2)")
    run.add_argument("--timeout", type=float, default=900.0, metavar="S",
                     help="kill the guest after S seconds (default 900); exit status 124")
    run.add_argument("--cwd", default=None, metavar="DIR", help="working directory in the guest (default: here)")
    run.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="set an environment variable for the command (repeatable)")
    run.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                     help="auto (default): KVM if a probe boot shows it works here, else TCG")
    run.add_argument("--show-boot", action="store_true", help="also print the guest's console before the command")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    run.set_defaults(handler=run_run)


def _cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="cache directory (default $VDPACERT_KERNEL_CACHE or ~/.cache/vdpacert/kernel)")


def _note(line: str) -> None:
    print(f"vdpacert kernel: {line}", file=sys.stderr, flush=True)


def run_prepare(args: argparse.Namespace) -> int:
    from vdpacert.kernel import KernelHarnessError, default_cache, prepare

    try:
        prepare(args.cache or default_cache(), progress=_note, refresh=args.refresh, accel=args.accel)
    except KernelHarnessError as error:
        _note(f"error: {error}")
        return 1
    return 0


def run_run(args: argparse.Namespace) -> int:
    from vdpacert.kernel import (
        GuestTimeout,
        KernelHarnessError,
        RunSpecError,
        VdpaDevice,
        default_cache,
        load_build,
        run,
    )
    from vdpacert.kernel.guest import command_line, parse_env

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        _note("name the command to run after --, e.g. vdpacert kernel run -- uname -r")
        return 2
    try:
        devices = [VdpaDevice.parse(spec) for spec in args.dev]
        env = parse_env(args.env)
    except RunSpecError as error:
        _note(str(error))
        return 2
    try:
        build = load_build(args.cache or default_cache())
        result = run(build, command, devices=devices, cwd=args.cwd, env=env, timeout=args.timeout,
                     memory_mib=args.memory, cpus=args.cpus,
                     on_accel=lambda choice: _note(f"booting Linux {build.release} with {choice.accel} "
                                                   f"({choice.reason}): {command_line(command)}"))
    except GuestTimeout as error:
        _note(f"error: {error}")
        return EXIT_TIMEOUT
    except RunSpecError as error:
        _note(str(error))
        return 2
    except KernelHarnessError as error:
        _note(f"error: {error}")
        return EXIT_HARNESS
    if args.show_boot and result.boot_log:
        print(result.boot_log, file=sys.stderr)
    _note(f"exit status {result.exit_status} after {result.seconds:.1f} s ({result.accel})")
    return result.exit_status
