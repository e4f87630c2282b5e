"""Feature negotiation as Z3 constraints: completing partial feature sets, breaking single rules.

Every constraint is generated from the model's own tables: one per row of
:func:`features.dependency_rules` (feature => every group has a member), the VERSION_1
rule, and the subset-of-offered rule. The two rules that :func:`features.violations` writes
as code rather than as rows get their level and citation by asking ``violations`` itself
(see :func:`_probe`), and every answer this module gives is checked back against
``violations``: a disagreement raises :class:`EncodingMismatch` instead of returning a
wrong set.

**Encoding: one Z3 Bool per bit the device's feature table knows**, rather than one 128-bit
``BitVec``. Every rule names its bits through the table, so bits the table does not know are
never constrained by any rule: they pass through unchanged (set exactly when the caller
asked for them) and need no solver variable. Bools make "fewest extra bits" a plain
``Optimize`` with one soft constraint per bit, where a bit-vector would need a popcount
term. Feature words are still checked to fit :data:`FEATURE_WIDTH` (128) bits, the width the
brief fixes for solver encodings, and a table bit at or past 128 is refused.

Public API::

    complete(device_id, must_set, must_clear=0, *, offered=None, include_should=True) -> int | None
    sample_valid(device_id, wish, *, offered=None, include_should=True) -> int | None
    rules(device_id, *, offered=None) -> tuple[FeatureRule, ...]
    broken_rules(device_id, features, *, offered=None) -> set[str]     # evaluated by Z3
    breaking_report(device_id, *, dependencies=None) -> BreakingReport
    breaking_sets(device_id, *, dependencies=None) -> dict[str, int]    # raises UnbreakableRules
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Final

import z3

from vdpacert.uapi.virtio_config import VIRTIO_F_VERSION_1

from . import features
from .features import SUBSET_RULE, VERSION_1_RULE, Dependency, dependency_rules, feature_table
from .spec import Citation, Level, SpecError, Violation

__all__ = [
    "FEATURE_WIDTH",
    "BadFeatureWord",
    "BreakingReport",
    "EncodingMismatch",
    "FeatureRule",
    "UnbreakableRules",
    "breaking_report",
    "breaking_sets",
    "broken_rules",
    "complete",
    "rules",
    "sample_valid",
]

#: Width of a feature word in the solver encodings (virtio v1.4 already defines bit 68).
FEATURE_WIDTH: Final = 128


class BadFeatureWord(SpecError, ValueError):
    """A feature word that is not a non-negative int of at most :data:`FEATURE_WIDTH` bits."""


class EncodingMismatch(SpecError):
    """Z3's answer disagrees with :func:`features.violations`: a bug in this encoding."""


class UnbreakableRules(SpecError):
    """Rules that no feature set breaks without also breaking another rule."""

    def __init__(self, device_id: int, rule_ids: Sequence[str]) -> None:
        self.device_id = device_id
        self.rule_ids = tuple(rule_ids)
        super().__init__(f"device type {device_id}: no set breaks only {', '.join(self.rule_ids)}")


@dataclass(frozen=True)
class FeatureRule:
    """One rule as a Z3 formula over the feature Bools, with the metadata of the rule it encodes."""

    rule: str
    level: Level
    citation: Citation
    holds: z3.BoolRef


@dataclass(frozen=True)
class BreakingReport:
    """For each rule id, a smallest set breaking only it; the rule ids for which none exists."""

    device_id: int
    sets: Mapping[str, int]
    unbreakable: tuple[str, ...]


def _check_word(name: str, word: int | None) -> None:
    if word is None:
        return
    if isinstance(word, bool) or not isinstance(word, int):
        raise BadFeatureWord(f"{name} must be an int feature word, got {type(word).__name__}")
    if word < 0:
        raise BadFeatureWord(f"{name}: a feature word is never negative")
    if word >> FEATURE_WIDTH:
        top = word.bit_length() - 1
        raise BadFeatureWord(f"{name}: feature words are {FEATURE_WIDTH} bits wide, got bit {top}")


@dataclass(frozen=True)
class _Encoding:
    device_id: int
    bools: Mapping[int, z3.BoolRef]  # bit number -> Bool
    known_mask: int

    def word(self, model: z3.ModelRef) -> int:
        chosen = [bit for bit, b in self.bools.items() if z3.is_true(model.eval(b, model_completion=True))]
        return sum(1 << bit for bit in chosen)

    def fixed(self, word: int) -> list[z3.BoolRef]:
        """Constraints pinning every known bit to its value in ``word``."""
        return [b if word >> bit & 1 else z3.Not(b) for bit, b in self.bools.items()]


@cache
def _encoding(device_id: int) -> _Encoding:
    bools: dict[int, z3.BoolRef] = {}
    for row in feature_table(device_id).values():
        if row.bit >= FEATURE_WIDTH:
            raise ValueError(f"{row.name} is bit {row.bit}, past the {FEATURE_WIDTH}-bit encoding")
        bools.setdefault(row.bit, z3.Bool(f"dev{device_id}_{row.name}"))
    mask = sum(1 << bit for bit in bools)
    return _Encoding(device_id, MappingProxyType(bools), mask)


def _probe(device_id: int, rule_id: str, features_word: int, offered: int | None) -> Violation:
    """The violation ``features.violations`` reports for ``rule_id`` on a word that breaks it."""
    for found in features.violations(device_id, features_word, offered=offered):
        if found.rule == rule_id:
            return found
    raise EncodingMismatch(f"features.violations no longer reports {rule_id}")


def _dependency_formula(enc: _Encoding, dep: Dependency) -> z3.BoolRef:
    def bool_of(name: str) -> z3.BoolRef:
        return enc.bools[features.bit_of(enc.device_id, name)]

    every_group = z3.And(*[z3.Or(*[bool_of(m) for m in group]) for group in dep.requires])
    return z3.Implies(bool_of(dep.feature), every_group)


def _rules(device_id: int, deps: Sequence[Dependency], offered: int | None) -> tuple[FeatureRule, ...]:
    enc = _encoding(device_id)
    by_id: dict[str, list[Dependency]] = {}
    for dep in deps:
        by_id.setdefault(dep.rule, []).append(dep)
    found = []
    for rule_id, rows in by_id.items():
        if len({(r.level, r.section) for r in rows}) != 1:
            raise EncodingMismatch(f"rows of {rule_id} disagree on level or section")
        formula = z3.And(*[_dependency_formula(enc, r) for r in rows])
        found.append(FeatureRule(rule_id, rows[0].level, rows[0].section, formula))
    version_1 = _probe(device_id, VERSION_1_RULE, 0, None)
    found.append(FeatureRule(VERSION_1_RULE, version_1.level, version_1.citation,
                             enc.bools[VIRTIO_F_VERSION_1]))
    if offered is not None:
        outside = ~offered & enc.known_mask
        if outside:
            lowest = outside & -outside
            subset = _probe(device_id, SUBSET_RULE, lowest, offered)
            found.append(FeatureRule(SUBSET_RULE, subset.level, subset.citation, z3.And(*[
                z3.Not(b) for bit, b in enc.bools.items() if outside >> bit & 1
            ])))
    return tuple(found)


def rules(device_id: int, *, offered: int | None = None) -> tuple[FeatureRule, ...]:
    """Every rule binding a driver's accepted set, as Z3 formulas; with ``offered``, the subset rule too."""
    _check_word("offered", offered)
    return _rules(device_id, dependency_rules(device_id), offered)


def broken_rules(device_id: int, features_word: int, *, offered: int | None = None) -> set[str]:
    """The ids of the rules ``features_word`` breaks, evaluated on the Z3 formulas (for cross-checks).

    Bits the table does not know are outside every formula; the subset rule still sees them.
    """
    _check_word("features", features_word)
    _check_word("offered", offered)
    enc = _encoding(device_id)
    values = [(b, z3.BoolVal(bool(features_word >> bit & 1))) for bit, b in enc.bools.items()]
    broken = {r.rule for r in rules(device_id, offered=offered)
              if z3.is_false(z3.simplify(z3.substitute(r.holds, *values)))}
    if offered is not None and features_word & ~offered & ~enc.known_mask:
        broken.add(SUBSET_RULE)
    return broken


def _minimize(enc: _Encoding, hard: Sequence[z3.BoolRef], prefer: Mapping[int, bool]) -> int | None:
    """A model of ``hard`` over the known bits, agreeing with ``prefer`` on as many bits as possible."""
    opt = z3.Optimize()
    opt.add(*hard)
    for bit, want in prefer.items():
        b = enc.bools[bit]
        opt.add_soft(b if want else z3.Not(b))
    verdict = opt.check()
    if verdict == z3.unsat:
        return None
    if verdict != z3.sat:
        raise EncodingMismatch(f"solver returned {verdict}: {opt.reason_unknown()}")
    return enc.word(opt.model())


def _check_back(device_id: int, word: int, offered: int | None, include_should: bool) -> None:
    found = features.violations(device_id, word, offered=offered)
    bad = [v for v in found if include_should or v.level is Level.MUST]
    if bad:
        raise EncodingMismatch(f"Z3 chose {word:#x}, which breaks {', '.join(v.rule for v in bad)}")


def complete(device_id: int, must_set: int, must_clear: int = 0, *, offered: int | None = None,
             include_should: bool = True) -> int | None:
    """The valid feature set containing ``must_set``, disjoint from ``must_clear``, with fewest extra bits.

    Valid means every MUST rule holds (and every SHOULD rule with ``include_should``), and,
    with ``offered``, that only offered bits are set. None when no such set exists, e.g.
    net MQ with CTRL_VQ cleared. Among equally small completions, which one is returned is
    the solver's choice.
    """
    for name, word in (("must_set", must_set), ("must_clear", must_clear), ("offered", offered)):
        _check_word(name, word)
    if must_set & must_clear or (offered is not None and must_set & ~offered):
        return None
    enc = _encoding(device_id)
    hard = [r.holds for r in rules(device_id, offered=offered) if include_should or r.level is Level.MUST]
    hard += [b for bit, b in enc.bools.items() if must_set >> bit & 1]
    hard += [z3.Not(b) for bit, b in enc.bools.items() if must_clear >> bit & 1]
    free = {bit: False for bit in enc.bools if not (must_set | must_clear) >> bit & 1}
    known = _minimize(enc, hard, free)
    if known is None:
        return None
    word = known | must_set & ~enc.known_mask
    _check_back(device_id, word, offered, include_should)
    return word


def sample_valid(device_id: int, wish: int, *, offered: int | None = None,
                 include_should: bool = True) -> int | None:
    """The valid set nearest to ``wish`` (fewest bits flipped), or None if no set is valid.

    A generator for property tests: map random words through this to get valid sets spread
    over the whole space, e.g. ``st.integers(0, 2**70 - 1).map(lambda w: sample_valid(NET, w))``.
    Unknown bits of ``wish`` are kept when ``offered`` allows them.
    """
    _check_word("wish", wish)
    _check_word("offered", offered)
    enc = _encoding(device_id)
    hard = [r.holds for r in rules(device_id, offered=offered) if include_should or r.level is Level.MUST]
    known = _minimize(enc, hard, {bit: bool(wish >> bit & 1) for bit in enc.bools})
    if known is None:
        return None
    unknown = wish & ~enc.known_mask
    if offered is not None:
        unknown &= offered
    word = known | unknown
    _check_back(device_id, word, offered, include_should)
    return word


def _python_broken(device_id: int, word: int, deps: Sequence[Dependency] | None) -> set[str]:
    """The rule ids broken by ``word``, according to the Python model (not Z3)."""
    by_model = {v.rule for v in features.violations(device_id, word)}
    if deps is None:
        return by_model
    return {d.rule for d in deps if d.missing(device_id, word)} | (by_model & {VERSION_1_RULE})


def breaking_report(device_id: int, *, dependencies: Sequence[Dependency] | None = None) -> BreakingReport:
    """For every rule, a smallest feature set that breaks that rule and no other (MUST or SHOULD).

    The rules are the device's dependency rows (or ``dependencies``, to examine a
    hypothetical table) plus the VERSION_1 rule. Each set is checked back with
    :func:`features.violations`. A smallest set has no proper subset breaking only the same
    rule, so each set is minimal in both senses.
    """
    deps = dependency_rules(device_id) if dependencies is None else tuple(dependencies)
    enc = _encoding(device_id)
    table = _rules(device_id, deps, None)
    found: dict[str, int] = {}
    unbreakable = []
    for target in table:
        hard = [z3.Not(target.holds), *[r.holds for r in table if r.rule != target.rule]]
        word = _minimize(enc, hard, {bit: False for bit in enc.bools})
        if word is None:
            unbreakable.append(target.rule)
            continue
        broken = _python_broken(device_id, word, None if dependencies is None else deps)
        if broken != {target.rule}:
            raise EncodingMismatch(
                f"{word:#x} should break only {target.rule}, the model says {sorted(broken)}"
            )
        found[target.rule] = word
    return BreakingReport(device_id, MappingProxyType(found), tuple(unbreakable))


def breaking_sets(device_id: int, *, dependencies: Sequence[Dependency] | None = None) -> dict[str, int]:
    """:func:`breaking_report`'s sets; raises :class:`UnbreakableRules` if any rule has none."""
    report = breaking_report(device_id, dependencies=dependencies)
    if report.unbreakable:
        raise UnbreakableRules(device_id, report.unbreakable)
    return dict(report.sets)
