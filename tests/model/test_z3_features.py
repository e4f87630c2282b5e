"""Z3 encodings of feature negotiation: completion, sampling, single-rule breaking sets.

The oracle is always :func:`features.violations` (the Python model), never the encoding
itself, and completion is checked against a brute-force search over a closed corner of the
net table.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import features, z3_features
from vdpacert.model.features import SUBSET_RULE, VERSION_1_RULE, Dependency, mask_of
from vdpacert.model.spec import Level, Violation
from vdpacert.model.z3_features import (
    FEATURE_WIDTH,
    BadFeatureWord,
    UnbreakableRules,
    breaking_report,
    breaking_sets,
    broken_rules,
    complete,
    sample_valid,
)

NET, BLK = 1, 2
V1 = mask_of(NET, "VERSION_1")
NET_KNOWN = sum(row.mask for row in features.feature_table(NET).values())
BLK_KNOWN = sum(row.mask for row in features.feature_table(BLK).values())
Z3 = settings(deadline=None, max_examples=60)


def _bits_of(mask: int) -> list[int]:
    return [1 << b for b in range(mask.bit_length()) if mask >> b & 1]


def submask(mask: int) -> st.SearchStrategy[int]:
    return st.lists(st.sampled_from(_bits_of(mask)), max_size=12).map(lambda bits: sum(set(bits)))


def _must_rules(found: list[Violation]) -> list[str]:
    return [v.rule for v in found if v.level is Level.MUST]


# --- complete(): known cases ---------------------------------------------------------------

def test_mq_without_ctrl_vq_completes_by_adding_ctrl_vq_and_version_1() -> None:
    assert complete(NET, mask_of(NET, "MQ")) == mask_of(NET, "MQ", "CTRL_VQ", "VERSION_1")


def test_mq_with_ctrl_vq_cleared_has_no_completion() -> None:
    assert complete(NET, mask_of(NET, "MQ"), mask_of(NET, "CTRL_VQ")) is None


def test_clearing_version_1_leaves_nothing_valid() -> None:
    assert complete(NET, 0, V1) is None
    assert complete(NET, 0, V1, include_should=False) is None


def test_empty_request_completes_to_version_1_alone() -> None:
    assert complete(NET, 0) == V1
    assert complete(BLK, 0) == V1
    assert complete(BLK, mask_of(BLK, "MQ", "FLUSH")) == mask_of(BLK, "MQ", "FLUSH", "VERSION_1")


def test_an_already_valid_set_is_returned_unchanged() -> None:
    valid = mask_of(NET, "VERSION_1", "CTRL_VQ", "MQ", "RSS", "CSUM", "HOST_TSO4", "HOST_ECN")
    assert features.violations(NET, valid) == []
    assert complete(NET, valid) == valid


def test_offered_steers_the_choice_between_alternatives() -> None:
    ecn = mask_of(NET, "GUEST_ECN")
    offered = mask_of(NET, "VERSION_1", "GUEST_CSUM", "GUEST_TSO6", "GUEST_ECN", "MQ", "CTRL_VQ")
    assert complete(NET, ecn, offered=offered) == mask_of(NET, "VERSION_1", "GUEST_CSUM", "GUEST_TSO6",
                                                          "GUEST_ECN")
    # Without the offer either TSO bit will do, but exactly one is added.
    free = complete(NET, ecn)
    assert free is not None and bin(free).count("1") == 4 and features.violations(NET, free) == []


def test_offered_can_make_completion_impossible() -> None:
    without_ctrl_vq = mask_of(NET, "VERSION_1", "MQ", "CSUM")
    assert complete(NET, mask_of(NET, "MQ"), offered=without_ctrl_vq) is None
    assert complete(NET, mask_of(NET, "CSUM"), offered=mask_of(NET, "CSUM")) is None  # no VERSION_1
    assert complete(NET, mask_of(NET, "MQ"), offered=V1) is None  # must_set outside the offer


def test_should_rules_are_optional() -> None:
    report = mask_of(NET, "HASH_REPORT")
    assert complete(NET, report) == report | V1 | mask_of(NET, "CTRL_VQ")
    assert complete(NET, report, include_should=False) == report | V1
    assert complete(NET, report, mask_of(NET, "CTRL_VQ")) is None
    assert complete(NET, report, mask_of(NET, "CTRL_VQ"), include_should=False) == report | V1


def test_conflicting_requests_have_no_completion() -> None:
    assert complete(NET, V1, V1) is None


def test_bits_no_table_knows_pass_through() -> None:
    unknown = 1 << 100
    assert unknown & ~NET_KNOWN
    assert complete(NET, unknown) == unknown | V1
    assert complete(NET, unknown, offered=V1) is None
    assert complete(NET, unknown, offered=V1 | unknown) == unknown | V1


@pytest.mark.parametrize("bad", [-1, 1 << FEATURE_WIDTH, True, "0x1", 1.0])
def test_bad_words_are_typed_errors(bad: object) -> None:
    word: Any = bad
    calls: list[Callable[[], object]] = [
        lambda: complete(NET, word), lambda: complete(NET, 0, word),
        lambda: complete(NET, 0, offered=word), lambda: sample_valid(NET, word),
    ]
    for call in calls:
        with pytest.raises(BadFeatureWord):
            call()
    assert issubclass(BadFeatureWord, ValueError)


# --- complete(): properties ----------------------------------------------------------------

@Z3
@given(submask(NET_KNOWN), submask(NET_KNOWN), st.booleans())
def test_completions_break_no_must_rule_and_are_minimal(must_set: int, must_clear: int, should: bool) -> None:
    must_clear &= ~must_set
    word = complete(NET, must_set, must_clear, include_should=should)
    if word is None:
        return
    assert _must_rules(features.violations(NET, word)) == []
    if should:
        assert features.violations(NET, word) == []
    assert word & must_set == must_set and word & must_clear == 0
    for extra in _bits_of(word & ~must_set):  # dropping any added bit leaves an invalid set
        found = features.violations(NET, word & ~extra)
        assert found if should else _must_rules(found)


# A corner of the net table closed under "requires": every requirement of these bits is among them.
CORNER = ("VERSION_1", "CSUM", "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "CTRL_VQ", "MQ",
          "RSS", "HASH_REPORT", "HASH_TUNNEL", "CTRL_RX_EXTRA")
CORNER_MASK = mask_of(NET, *CORNER)


@cache
def _valid_corner_sets(include_should: bool) -> tuple[int, ...]:
    found = []
    for chosen in itertools.product((0, 1), repeat=len(CORNER)):
        word = mask_of(NET, *(name for name, on in zip(CORNER, chosen, strict=True) if on))
        broken = features.violations(NET, word)
        if not (broken if include_should else _must_rules(broken)):
            found.append(word)
    return tuple(found)


def test_the_corner_is_closed_under_requirements() -> None:
    for dep in features.dependency_rules(NET):
        if mask_of(NET, dep.feature) & CORNER_MASK:
            assert all(set(group) <= set(CORNER) for group in dep.requires), dep.rule


@Z3
@given(submask(CORNER_MASK), submask(CORNER_MASK), submask(CORNER_MASK), st.booleans(), st.booleans())
def test_completion_matches_brute_force(must_set: int, must_clear: int, offer_gap: int, restrict: bool,
                                        should: bool) -> None:
    must_clear &= ~must_set
    offered = (NET_KNOWN & ~offer_gap) if restrict else None
    word = complete(NET, must_set, must_clear | ~CORNER_MASK & NET_KNOWN, offered=offered,
                    include_should=should)
    candidates = [w for w in _valid_corner_sets(should) if w & must_set == must_set and not w & must_clear
                  and (offered is None or not w & ~offered)]
    if not candidates:
        assert word is None
    else:
        assert word in candidates
        assert bin(word).count("1") == min(bin(w).count("1") for w in candidates)


# --- sample_valid ---------------------------------------------------------------------------

@Z3
@given(st.integers(0, (1 << 72) - 1), submask(NET_KNOWN))
def test_samples_are_valid_subsets_of_the_offer(wish: int, gap: int) -> None:
    offered = (NET_KNOWN | (1 << 70)) & ~gap
    word = sample_valid(NET, wish, offered=offered)
    if not offered & V1:
        assert word is None
        return
    assert word is not None
    assert features.violations(NET, word, offered=offered) == []


@Z3
@given(st.integers(0, (1 << 72) - 1))
def test_a_valid_wish_is_its_own_nearest_sample(wish: int) -> None:
    word = sample_valid(NET, wish)
    assert word is not None and features.violations(NET, word) == []
    assert sample_valid(NET, word) == word


# --- the encoding agrees with the Python model ----------------------------------------------

@Z3
@given(st.integers(0, (1 << 72) - 1), st.one_of(st.none(), st.integers(0, (1 << 72) - 1)),
       st.sampled_from([NET, BLK]))
def test_z3_rules_break_exactly_where_violations_says(word: int, offered: int | None, device: int) -> None:
    expected = {v.rule for v in features.violations(device, word, offered=offered)}
    assert broken_rules(device, word, offered=offered) == expected


def test_rule_metadata_is_taken_from_the_model() -> None:
    by_id = {r.rule: r for r in z3_features.rules(NET, offered=V1)}
    for dep in features.dependency_rules(NET):
        assert (by_id[dep.rule].level, by_id[dep.rule].citation) == (dep.level, dep.section)
    [v1] = [v for v in features.violations(NET, 0) if v.rule == VERSION_1_RULE]
    assert (by_id[VERSION_1_RULE].level, by_id[VERSION_1_RULE].citation) == (v1.level, v1.citation)
    [subset] = [v for v in features.violations(NET, 1, offered=0) if v.rule == SUBSET_RULE]
    assert (by_id[SUBSET_RULE].level, by_id[SUBSET_RULE].citation) == (subset.level, subset.citation)
    assert len(by_id) == len(features.dependency_rules(NET)) + 2


# --- breaking sets --------------------------------------------------------------------------

@pytest.mark.parametrize("device", [NET, BLK])
def test_every_rule_can_be_broken_alone(device: int) -> None:
    report = breaking_report(device)
    assert report.unbreakable == ()
    expected = {dep.rule for dep in features.dependency_rules(device)} | {VERSION_1_RULE}
    assert set(report.sets) == expected
    assert breaking_sets(device) == dict(report.sets)


@pytest.mark.parametrize("device", [NET, BLK])
def test_each_breaking_set_breaks_exactly_its_rule_and_is_minimal(device: int) -> None:
    deps = {dep.rule: dep for dep in features.dependency_rules(device)}
    for rule, word in breaking_sets(device).items():
        assert {v.rule for v in features.violations(device, word)} == {rule}
        for bit in _bits_of(word):  # no smaller set breaks only this rule
            assert {v.rule for v in features.violations(device, word & ~bit)} != {rule}
        if rule in deps:
            assert word & mask_of(device, deps[rule].feature)
            assert word & V1  # otherwise VERSION_1 would break too
        else:
            assert word == 0


def test_breaking_sets_of_net_are_the_feature_and_version_1() -> None:
    sets = breaking_sets(NET)
    assert sets["net.MQ.requires"] == mask_of(NET, "MQ", "VERSION_1")
    assert sets["net.HASH_TUNNEL.requires"] == mask_of(NET, "HASH_TUNNEL", "VERSION_1")
    assert sets[VERSION_1_RULE] == 0


def test_a_rule_that_cannot_break_alone_is_reported() -> None:
    # A hypothetical table in which two rows state the same requirement: breaking one breaks both.
    base = next(dep for dep in features.dependency_rules(NET) if dep.feature == "MQ")
    twin = Dependency("net.MQ.requires.twin", base.feature, base.requires, base.level, base.section)
    rss = next(dep for dep in features.dependency_rules(NET) if dep.feature == "RSS")
    table = (base, twin, rss)
    report = breaking_report(NET, dependencies=table)
    assert report.unbreakable == (base.rule, twin.rule)
    assert set(report.sets) == {rss.rule, VERSION_1_RULE}
    with pytest.raises(UnbreakableRules) as caught:
        breaking_sets(NET, dependencies=table)
    assert caught.value.rule_ids == (base.rule, twin.rule)
    assert base.rule in str(caught.value)
