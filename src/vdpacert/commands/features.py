"""``vdpacert features``: check a feature word against the spec's rules, or explain the rules.

``check`` reads a feature word as the driver's accepted set (or, with ``--offer``, as the
device's offer), prints every rule it breaks with the section that states it, and exits 1
when a MUST rule is broken. SHOULD rules are printed as warnings and do not fail the check.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vdpacert.model import features
from vdpacert.model.spec import Level, Violation

EXIT_OK = 0
EXIT_MUST_BROKEN = 1
EXIT_USAGE = 2


def device_id_of(text: str) -> int:
    """``net``, ``blk`` or a numeric virtio device ID."""
    name = text.strip().lower()
    if name in features.DEVICE_NAMES:
        return features.DEVICE_NAMES[name]
    try:
        device_id = int(name, 0)
    except ValueError:
        known = ", ".join(features.DEVICE_NAMES)
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use {known} or a device ID") from None
    if device_id <= 0:
        raise argparse.ArgumentTypeError(f"a virtio device ID is positive, got {device_id}")
    return device_id


def device_label(device_id: int) -> str:
    names = {value: key for key, value in features.DEVICE_NAMES.items()}
    return f"{names[device_id]} (device ID {device_id})" if device_id in names else f"device ID {device_id}"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("features", help="check or explain feature negotiation rules")
    actions = parser.add_subparsers(dest="features_command", metavar="ACTION", required=True)

    check = actions.add_parser("check", help="check a feature word against the spec's rules")
    check.add_argument("--device", required=True, type=device_id_of, help="net, blk or a device ID")
    check.add_argument("--offer", action="store_true",
                       help="check FEATURES as the device's offered set instead of the driver's accepted set")
    check.add_argument("--offered", metavar="FEATURES",
                       help="the device's offered set: also check the driver accepted nothing outside it")
    check.add_argument("features", metavar="FEATURES",
                       help="hex (0x308830028) or bit names (VERSION_1,CTRL_VQ,MQ)")
    check.set_defaults(handler=run_check)

    explain = actions.add_parser("explain", help="print the feature bits and dependency rules of a device")
    explain.add_argument("--device", required=True, type=device_id_of, help="net, blk or a device ID")
    explain.set_defaults(handler=run_explain)


def run_check(args: argparse.Namespace) -> int:
    try:
        word = features.parse_features(args.device, args.features)
        offered = None if args.offered is None else features.parse_features(args.device, args.offered)
    except features.UnknownFeature as error:
        print(f"vdpacert features check: {error}", file=sys.stderr)
        return EXIT_USAGE
    side = "offered" if args.offer else "accepted"
    names = ", ".join(features.names_of(args.device, word)) or "(none)"
    print(f"{device_label(args.device)}: {side} features {word:#x} = {names}")
    if args.offer:
        found = features.offer_violations(args.device, word)
    else:
        found = features.violations(args.device, word, offered=offered)
    for violation in found:
        print(format_violation(violation))
    must = sum(v.level is Level.MUST for v in found)
    should = len(found) - must
    if not found:
        print("valid: no rule broken")
    else:
        print(f"{must} MUST rule(s) broken, {should} SHOULD rule(s) broken")
    return EXIT_MUST_BROKEN if must else EXIT_OK


def format_violation(violation: Violation) -> str:
    tag = "FAIL" if violation.level is Level.MUST else "WARN"
    return f"{tag} {violation.level} {violation.rule}: {violation.message}\n     {violation.citation}"


def run_explain(args: argparse.Namespace) -> int:
    table = features.feature_table(args.device)
    print(f"Feature bits of {device_label(args.device)}")
    section = None
    for row in sorted(table.values(), key=lambda r: (str(r.section), r.bit)):
        if row.section != section:
            section = row.section
            print(f"\n  {section}")
        print(f"    {row.bit:>3}  {row.name:<26} {row.summary}")
    rules = features.dependency_rules(args.device)
    print(f"\nDependency rules ({len(rules)}):")
    if not rules:
        print("  (none: no feature bit of this device requires another)")
    for rule in rules:
        print(f"  {rule.level!s:<6} {rule.describe():<64} [{rule.section}]")
    print("\nAlways:")
    print("  MUST   the driver accepts VERSION_1 and nothing the device did not offer"
          "  [virtio v1.3 §6.1, §2.2.1]")
    print("  MUST   the device offers VERSION_1 and no feature without what it requires"
          "  [virtio v1.3 §6.2, §2.2.2]")
    return EXIT_OK
