"""The Z3 proofs hold, the proof machinery can fail, and the symbolic adapter is faithful.

A proof that could never fail proves nothing, so each family is also run on a deliberately
wrong variant and must come back with a counterexample that really breaks the property.
The adapter (:class:`Sym`) is checked against plain Python on concrete values.
"""

from __future__ import annotations

from typing import Any

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import dirty_log, ring_index, z3_proofs
from vdpacert.model.spec import LinuxSource, Section
from vdpacert.model.z3_proofs import (
    Explorer,
    ProofResult,
    Sym,
    SymbolicUnsupported,
    SymBool,
    all_proofs,
    as_int,
    prove_dirty_log_span,
    prove_inflight_step,
    prove_need_event_window,
)

u16 = st.integers(0, 0xFFFF)
Z3 = settings(deadline=None, max_examples=40)


def _in_window(event: int, new: int, old: int) -> bool:
    return event in {(old + i) & 0xFFFF for i in range((new - old) & 0xFFFF)}


# --- the proofs ----------------------------------------------------------------------------

EXPECTED = {
    "vring_need_event.window", "split_inflight.initial", "split_inflight.device_consume",
    "split_inflight.driver_publish", "packed_base.decode_encode", "packed_base.encode_decode",
    "packed_base.domain", "dirty_log.page_span",
}


@pytest.fixture(scope="module")
def proofs() -> dict[str, ProofResult]:
    return {p.name: p for p in all_proofs()}


def test_all_proofs_are_run(proofs: dict[str, ProofResult]) -> None:
    assert set(proofs) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_proof_holds(proofs: dict[str, ProofResult], name: str) -> None:
    result = proofs[name]
    assert result.proved, str(result)
    assert result.counterexample is None
    assert result.property and isinstance(result.section, (Section, LinuxSource))
    assert "proved" in str(result)


# --- the proofs can fail -------------------------------------------------------------------

def test_a_wrong_need_event_is_refuted_with_a_real_counterexample() -> None:
    def off_by_one(event: Any, new: Any, old: Any) -> Any:
        return ring_index.u16(new - event - 1) <= ring_index.u16(new - old)

    result = prove_need_event_window(off_by_one)
    assert not result.proved and result.counterexample is not None
    cex = result.counterexample
    event, new, old = cex["event"], cex["new"], cex["old"]
    assert off_by_one(event, new, old) != _in_window(event, new, old)
    assert ring_index.vring_need_event(event, new, old) == _in_window(event, new, old)


def test_publishing_without_the_bound_is_refuted() -> None:
    def reckless_publish(avail_idx: Any, last_avail_idx: Any, num: Any, k: Any) -> tuple[Any, Any]:
        return ring_index.u16(avail_idx + k), last_avail_idx

    result = prove_inflight_step("reckless_publish", reckless_publish, z3_proofs.SPLIT_STEPS[1][2])
    assert not result.proved and result.counterexample is not None
    cex = result.counterexample
    avail, last, num, k = cex["avail_idx"], cex["last_avail_idx"], cex["num"], cex["k"]
    assert ring_index.split_inflight(avail, last) <= num
    assert ring_index.split_inflight(ring_index.u16(avail + k), last) > num


def test_consuming_from_an_empty_ring_is_refuted() -> None:
    def greedy_consume(avail_idx: Any, last_avail_idx: Any, num: Any, k: Any) -> tuple[Any, Any]:
        return avail_idx, ring_index.u16(last_avail_idx + 1)

    result = prove_inflight_step("greedy_consume", greedy_consume, z3_proofs.SPLIT_STEPS[0][2])
    assert not result.proved
    assert result.counterexample is not None
    assert result.counterexample["avail_idx"] == result.counterexample["last_avail_idx"]


def test_a_span_that_forgets_the_page_of_the_last_byte_is_refuted() -> None:
    def short_span(addr: Any, length: Any) -> tuple[Any, Any]:
        if addr >= dirty_log.ADDRESS_SPACE or addr + length > dirty_log.ADDRESS_SPACE:
            raise ValueError("not a 64-bit write")
        return addr // dirty_log.VHOST_PAGE_SIZE, (addr + length) // dirty_log.VHOST_PAGE_SIZE

    result = prove_dirty_log_span(short_span)
    assert not result.proved and result.counterexample is not None
    addr, length = result.counterexample["addr"], result.counterexample["length"]
    assert range(*short_span(addr, length)) != dirty_log.pages_touched(addr, length)


def test_a_span_that_accepts_writes_past_2_64_is_refuted() -> None:
    def unbounded(addr: Any, length: Any) -> tuple[Any, Any]:
        first = addr // dirty_log.VHOST_PAGE_SIZE
        if length == 0:
            return first, first
        return first, (addr + length - 1) // dirty_log.VHOST_PAGE_SIZE + 1

    result = prove_dirty_log_span(unbounded)
    assert not result.proved and result.counterexample is not None
    assert result.counterexample["addr"] + result.counterexample["length"] > dirty_log.ADDRESS_SPACE \
        or result.counterexample["addr"] >= dirty_log.ADDRESS_SPACE


# --- the adapter evaluates the model's functions faithfully ------------------------------

def _const(explorer: Explorer, value: int, width: int) -> Sym:
    return Sym(z3.BitVecVal(value, width), True, explorer)


def _single_outcome(fn: Any) -> Any:
    paths = Explorer().explore(fn)
    assert len(paths) == 1
    return paths[0]


def _concrete(value: Any) -> Any:
    if isinstance(value, Sym):
        assert value.exact
        return z3.simplify(value.bv).as_long()
    if isinstance(value, SymBool):
        return z3.is_true(z3.simplify(value.cond))
    if isinstance(value, tuple):
        return tuple(_concrete(v) for v in value)
    return value


@Z3
@given(u16, u16, u16)
def test_need_event_on_constants_matches_python(event: int, new: int, old: int) -> None:
    explorer = Explorer()
    path = _single_outcome(lambda: ring_index.vring_need_event(
        *(as_int(_const(explorer, v, 16)) for v in (event, new, old))))
    expected = ring_index.vring_need_event(event, new, old)
    assert _concrete(path.outcome) == expected == _in_window(event, new, old)


@Z3
@given(st.integers(0, 2**66), st.integers(0, 2**66))
def test_page_span_on_constants_matches_python(addr: int, length: int) -> None:
    explorer = Explorer()
    path = _single_outcome(
        lambda: dirty_log.page_span(_const(explorer, addr, 67), _const(explorer, length, 67))
    )
    try:
        expected = dirty_log.page_span(addr, length)
    except ValueError as exc:
        assert type(path.error) is type(exc)
    else:
        assert path.error is None and _concrete(path.outcome) == expected


@Z3
@given(st.integers(0, 2**34))
def test_packed_decode_on_constants_matches_python(num: int) -> None:
    explorer = Explorer()
    path = _single_outcome(lambda: ring_index.decode_packed_base(as_int(_const(explorer, num, 35))))
    try:
        expected = ring_index.decode_packed_base(num)
    except ValueError:
        assert isinstance(path.error, ValueError)
    else:
        fields = ("last_avail_idx", "last_avail_counter", "last_used_idx", "last_used_counter")
        assert [_concrete(getattr(path.outcome, f)) for f in fields] == [getattr(expected, f) for f in fields]


def test_a_mask_wider_than_a_wrapped_value_is_refused_not_guessed() -> None:
    # x - y went negative, so it is known only modulo 2^21; masking it with a 22-bit mask would
    # need the bits above 2^21, which the adapter does not have: it must refuse, not guess.
    explorer = Explorer()
    x, y = _const(explorer, 0, 21), _const(explorer, 1, 21)
    with pytest.raises(SymbolicUnsupported):
        _ = _single_outcome(lambda: (x - y) & 2**21).outcome


# c stays below 2^21: masks are never wider than the 21-bit values they mask (see the test above).
@given(st.integers(0, 2**20), st.integers(0, 2**20), st.integers(-5, 2**21 - 1))
@settings(deadline=None, max_examples=60)
def test_arithmetic_on_constants_matches_python(a: int, b: int, c: int) -> None:
    explorer = Explorer()
    x, y = _const(explorer, a, 21), _const(explorer, b, 21)
    cases = [
        (lambda: (x - y - 1) & 0xFFFF, (a - b - 1) & 0xFFFF),
        (lambda: (x + y + c) & 0xFFFFF, (a + b + c) & 0xFFFFF),
        (lambda: x + y + c if c >= 0 else x + y, a + b + c if c >= 0 else a + b),
        (lambda: (x | y << 3) >> 2, (a | b << 3) >> 2),
        (lambda: x // 7 + x % 7, a // 7 + a % 7),
        (lambda: (x + y < c, x - 0 >= y, x == c, x != b), (a + b < c, a >= b, a == c, a != b)),
        (lambda: (x - y) & (c if c >= 0 else 0xFF), (a - b) & (c if c >= 0 else 0xFF)),
    ]
    for fn, expected in cases:
        assert _concrete(_single_outcome(fn).outcome) == expected


# --- the adapter refuses what it cannot do --------------------------------------------------

def test_the_explorer_forks_on_branches_and_prunes_infeasible_ones() -> None:
    explorer = Explorer([z3.ULT(z3.BitVec("x", 8), 200)])
    x = Sym(z3.BitVec("x", 8), True, explorer)
    paths = explorer.explore(lambda: "small" if x < 10 else ("large" if x >= 200 else "middle"))
    assert sorted(str(p.outcome) for p in paths) == ["middle", "small"]


def test_errors_end_a_path_and_other_exceptions_propagate() -> None:
    explorer = Explorer()
    x = explorer.var("x", 8)

    def check() -> int:
        if x > 100:
            raise ValueError("big")
        return 1

    paths = explorer.explore(check)
    assert sorted(type(p.error).__name__ for p in paths) == ["NoneType", "ValueError"]
    with pytest.raises(KeyError):
        explorer.explore(lambda: dict[str, int]()["missing"])


def test_values_known_only_modulo_the_width_cannot_be_ordered() -> None:
    explorer = Explorer()
    x, y = explorer.var("x", 16), explorer.var("y", 16)
    diff = x - y
    assert not diff.exact
    for op in (lambda: diff < 3, lambda: diff >> 1, lambda: diff // 2, lambda: bool(diff),
               lambda: diff & (1 << 20), lambda: range(as_int(x)), lambda: x * 2):  # type: ignore[operator]
        with pytest.raises((SymbolicUnsupported, TypeError)):
            op()
    assert (diff & 0xFFFF).exact  # a mask below 2^16 makes it exact again
    assert issubclass(SymbolicUnsupported, TypeError)


def test_unbounded_loops_are_refused() -> None:
    explorer = Explorer()
    x = explorer.var("x", 16)

    def count_down() -> int:
        steps = 0
        while x > steps:
            steps += 1
        return steps

    with pytest.raises(SymbolicUnsupported):
        explorer.explore(count_down)
