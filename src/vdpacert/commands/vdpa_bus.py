"""``vdpacert mgmtdev show`` and ``vdpacert dev add|del|show``: the reference vdpa bus, like iproute2's ``vdpa``.

The bus lives in the process that runs the command. Unlike the kernel's vdpa bus, nothing
outlives the command: ``dev add`` creates a device, prints it (``vdpa dev show`` and ``vdpa
dev config show`` fields) and exits, and a later ``dev show`` in a new process starts from an
empty bus. The commands are for seeing what a management device builds from given attributes
and for scripts that drive the bus through :func:`run` in one process.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

from vdpacert.impl.bus import ATTRIBUTES, VdpaBus, default_bus

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_EPHEMERAL = ("note: the reference vdpa bus lives in this process only; devices made by an earlier "
              "`vdpacert dev add` are gone. Use `dev add NAME ... --show` to inspect a device.")


def register(subparsers: Any) -> None:
    mgmt = subparsers.add_parser("mgmtdev", help="list the reference vdpa management devices")
    mgmt_actions = mgmt.add_subparsers(dest="mgmtdev_command", metavar="ACTION", required=True)
    show = mgmt_actions.add_parser("show", help="show management devices (vdpa mgmtdev show)")
    show.add_argument("name", nargs="?", help="only this management device")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=run_mgmtdev_show)

    dev = subparsers.add_parser(
        "dev", help="create, delete or show vdpa devices on the in-process reference bus",
        description="Devices exist only inside the running vdpacert process: a new command starts with none.")
    dev_actions = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    add = dev_actions.add_parser("add", help="create a device (vdpa dev add); it lives until the command exits")
    add.add_argument("name")
    add.add_argument("--mgmtdev", required=True, help="management device, e.g. sim-net or sim-blk")
    add.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                     help=f"device attribute, repeatable; keys: {', '.join(sorted(ATTRIBUTES))}")
    add.add_argument("--show", action="store_true",
                     help="also print the device's config and features (vdpa dev config show)")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(handler=run_dev_add)
    delete = dev_actions.add_parser("del", help="delete a device made in this process (vdpa dev del)")
    delete.add_argument("name")
    delete.set_defaults(handler=run_dev_del)
    dshow = dev_actions.add_parser("show", help="show devices made in this process (vdpa dev show)")
    dshow.add_argument("name", nargs="?")
    dshow.add_argument("--json", action="store_true", help="print JSON")
    dshow.set_defaults(handler=run_dev_show)


def _bus(args: argparse.Namespace) -> VdpaBus:
    bus = getattr(args, "bus", None)
    return bus if isinstance(bus, VdpaBus) else default_bus()


def _fail(command: str, error: OSError) -> int:
    # ENOTSUP and EOPNOTSUPP share a value on Linux; the kernel's vdpa code says EOPNOTSUPP.
    name = "EOPNOTSUPP" if error.errno == errno.EOPNOTSUPP else errno.errorcode.get(error.errno or 0, str(error.errno))
    print(f"vdpacert {command}: {error.strerror or error} ({name})", file=sys.stderr)
    return EXIT_USAGE if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.EEXIST) else EXIT_FAILED


def _features(value: int) -> str:
    bits = [str(bit) for bit in range(value.bit_length()) if value >> bit & 1]
    return f"{value:#x}" + (f" (bits {','.join(bits)})" if bits else "")


def run_mgmtdev_show(args: argparse.Namespace) -> int:
    try:
        shown = _bus(args).mgmtdev_show(args.name)
    except OSError as error:
        return _fail("mgmtdev show", error)
    if args.json:
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    if not shown:
        print("no management devices are registered (the sim-net / sim-blk modules are not installed)")
    for entry in shown:
        print(f"{entry['name']}:")
        print(f"  supported_classes {' '.join(entry['supported_classes'])}")
        print(f"  max_supported_vqs {entry['max_supported_vqs']}")
        print(f"  dev_features {_features(entry['dev_features'])}")
        print(f"  attributes {' '.join(entry['supported_attrs']) or '(none)'}")
    return EXIT_OK


def _parse_attr_args(pairs: list[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OSError(errno.EINVAL, f"--attr {pair!r} is not KEY=VALUE")
        attrs[key.strip()] = value.strip()
    return attrs


def _print_device(row: dict[str, Any]) -> None:
    print(f"{row['name']}: type {row['type']} mgmtdev {row['mgmtdev']} vendor_id {row['vendor_id']} "
          f"max_vqs {row['max_vqs']} max_vq_size {row['max_vq_size']}")


def _print_config(config: dict[str, Any]) -> None:
    fields = [f"{key} {config[key]}" for key in ("mac", "link", "mtu", "max_vq_pairs", "capacity", "size_max",
                                                  "seg_max", "blk_size", "num_queues") if key in config]
    print(f"{config['name']}: {' '.join(fields)}".rstrip())
    print(f"  dev_features {_features(config['dev_features'])}")
    print(f"  negotiated_features {_features(config['negotiated_features'])}")
    print(f"  config {config['config']}")


def run_dev_add(args: argparse.Namespace) -> int:
    bus = _bus(args)
    try:
        attrs = _parse_attr_args(args.attr)
        bus.dev_add(args.name, args.mgmtdev, **attrs)
        row = bus.dev_show(args.name)[0]
        config = bus.dev_config_show(args.name) if args.show else None
    except OSError as error:
        return _fail("dev add", error)
    if args.json:
        print(json.dumps({"dev": row, "config": config}, indent=2))
        return EXIT_OK
    _print_device(row)
    if config is not None:
        _print_config(config)
    if getattr(args, "bus", None) is None and not os.environ.get("VDPACERT_QUIET"):
        print(_EPHEMERAL, file=sys.stderr)
    return EXIT_OK


def run_dev_del(args: argparse.Namespace) -> int:
    try:
        _bus(args).dev_del(args.name)
    except OSError as error:
        if error.errno == errno.ENODEV and getattr(args, "bus", None) is None:
            print(_EPHEMERAL, file=sys.stderr)
        return _fail("dev del", error)
    return EXIT_OK


def run_dev_show(args: argparse.Namespace) -> int:
    try:
        shown = _bus(args).dev_show(args.name)
    except OSError as error:
        return _fail("dev show", error)
    if args.json:
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    if not shown:
        print("no vdpa devices in this process")
        print(_EPHEMERAL, file=sys.stderr)
    for row in shown:
        _print_device(row)
    return EXIT_OK
