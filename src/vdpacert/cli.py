"""The ``vdpacert`` command line.

Each subcommand lives in its own module under :mod:`vdpacert.commands` and registers itself
through ``register(subparsers)``; this module only builds the top-level parser and dispatches.
A command returns its exit status: 0 success, 1 a MUST rule broken, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ._version import __version__
from .commands import bench, certify, features, fuzz, kernel, migrate, mutants, rules, soak, vdpa_bus

#: Modules contributing subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (features, rules, vdpa_bus, bench, certify, mutants, migrate, soak, fuzz, kernel)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdpacert",
        description="Conformance and live-migration testing for virtio / vhost / vDPA devices.",
    )
    parser.add_argument("--version", action="version", version=f"vdpacert {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader (``| head``) went away; that is not the command's failure.
        sys.stderr.close()
        return 0
