"""Proofs, over all bit-vector values, of the model's index and dirty-log arithmetic.

Each proof states a property in words, cites the section it backs, and is discharged by
asking Z3 whether the property's negation is satisfiable: ``unsat`` means it holds for every
input, ``sat`` yields a counterexample.

**The model's own functions are proved, not retyped copies.** ``ring_index`` and
``dirty_log`` are plain Python over ``int``; they are run here unchanged on :class:`Sym`
values, small wrappers around Z3 bit-vectors that implement the operators those functions
use (``+ - & | << >> // %`` and comparisons) with Python's unbounded-integer meaning:

- a :class:`Sym` is *exact* when its bit-vector, read unsigned, IS the Python integer, and
  otherwise only known modulo ``2^width``. ``+`` of exact values widens by one bit, so never
  overflows; ``a - b`` stays exact when the solver shows ``a >= b`` on the current path, and
  otherwise (a possibly negative result) is known modulo ``2^width`` only. ``x & m`` with a
  mask below ``2^width`` is exact again, which is how ``u16(new - old)`` comes out right.
  Comparisons, ``>>``, ``//`` and truth tests demand exact operands and raise
  :class:`SymbolicUnsupported` otherwise, so the adapter can refuse but never silently lie.
- a comparison yields a :class:`SymBool`. When Python needs a real ``bool`` from it (an
  ``if``, ``and``, ``not``, ``in``), :class:`Explorer` decides the branch: it asks the
  solver which outcomes are feasible on the current path, takes one and schedules the
  other, then re-runs the function down every feasible path. Each :class:`Path` carries
  its path condition and its result or its (expected) exception, and the proof obligation
  is the conjunction over all paths. Raising ``ValueError`` is an outcome like any other,
  so "decode rejects exactly the values past 32 bits" is provable too.

The in-flight steps of the split ring (the device consumes one chain, the driver publishes
``k``) are not functions of the model yet; :data:`SPLIT_STEPS` writes them as the brief
states them, over ``ring_index.split_inflight`` and ``ring_index.u16``.

Public API::

    all_proofs() -> list[ProofResult]
    prove_need_event_window(fn=ring_index.vring_need_event) -> ProofResult
    prove_split_inflight() -> list[ProofResult]
    prove_inflight_step(name, step, section) -> ProofResult      # one step of SPLIT_STEPS, or any
    prove_packed_base() -> list[ProofResult]
    prove_dirty_log_span(fn=dirty_log.page_span) -> ProofResult
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import z3

from . import dirty_log, ring_index, sections
from .spec import Citation, SpecError

__all__ = [
    "SPLIT_STEPS",
    "Explorer",
    "Path",
    "ProofResult",
    "Sym",
    "SymBool",
    "SymbolicUnsupported",
    "all_proofs",
    "as_bool",
    "as_int",
    "device_consume",
    "driver_publish",
    "prove_dirty_log_span",
    "prove_inflight_step",
    "prove_need_event_window",
    "prove_packed_base",
    "prove_split_inflight",
    "value_eq",
]


class SymbolicUnsupported(SpecError, TypeError):
    """The adapter met an operation it cannot evaluate with Python's integer meaning."""


@dataclass(frozen=True)
class ProofResult:
    """One property, where it comes from, and whether Z3 proved it for every input."""

    name: str
    property: str
    section: Citation
    proved: bool
    counterexample: dict[str, int] | None

    def __str__(self) -> str:
        verdict = "proved" if self.proved else f"FAILED, counterexample {self.counterexample}"
        return f"{self.name}: {self.property} [{self.section}] {verdict}"


# --------------------------------------------------------------------------------------
# Symbolic evaluation of the model's integer functions.

Term = Any  # a Sym or a Python int


@dataclass(frozen=True)
class Path:
    """One feasible way through a function: the branch conditions taken, and how it ended."""

    condition: z3.BoolRef
    outcome: object
    error: Exception | None


class Explorer:
    """Runs a function on :class:`Sym` inputs down every feasible branch (see module docstring)."""

    MAX_DECISIONS: Final = 64
    MAX_PATHS: Final = 256

    def __init__(self, assumptions: Sequence[z3.BoolRef] = ()) -> None:
        self.assumptions = list(assumptions)
        self._prefix: tuple[bool, ...] = ()
        self._decisions: list[bool] = []
        self._conditions: list[z3.BoolRef] = []
        self._pending: list[tuple[bool, ...]] = []

    def var(self, name: str, width: int) -> Sym:
        """A fresh input: any integer in ``[0, 2^width)``."""
        return Sym(z3.BitVec(name, width), True, self)

    def feasible(self, condition: z3.BoolRef) -> bool:
        """Can ``condition`` hold together with the assumptions and the current path?"""
        solver = z3.Solver()
        solver.add(*self.assumptions, *self._conditions, condition)
        verdict = solver.check()
        if verdict == z3.unknown:
            raise SymbolicUnsupported(f"solver gave up deciding a branch: {solver.reason_unknown()}")
        return bool(verdict == z3.sat)

    def decide(self, condition: z3.BoolRef) -> bool:
        index = len(self._decisions)
        if index >= self.MAX_DECISIONS:
            raise SymbolicUnsupported("too many branches on one path (a loop over a symbolic value?)")
        if index < len(self._prefix):
            choice = self._prefix[index]
        else:
            can_true = self.feasible(condition)
            if can_true and self.feasible(z3.Not(condition)):
                self._pending.append((*self._decisions, False))
            choice = can_true
        self._decisions.append(choice)
        self._conditions.append(condition if choice else z3.Not(condition))
        return choice

    def explore(self, fn: Callable[[], object],
                expected: tuple[type[Exception], ...] = (ValueError,)) -> list[Path]:
        """Every feasible path of ``fn()``; exceptions of the ``expected`` types end a path."""
        paths: list[Path] = []
        self._pending = [()]
        while self._pending:
            self._prefix = self._pending.pop()
            self._decisions, self._conditions = [], []
            outcome: object = None
            error: Exception | None = None
            try:
                outcome = fn()
            except SymbolicUnsupported:
                raise
            except expected as exc:
                error = exc
            paths.append(Path(z3.And(*self._conditions), outcome, error))
            if len(paths) > self.MAX_PATHS:
                raise SymbolicUnsupported("too many paths")
        return paths


def _is_exact(term: Term) -> bool:
    return term.exact if isinstance(term, Sym) else term >= 0


def _width(term: Term) -> int | None:
    """Bits needed to hold an exact term; None for a negative constant (known modulo anything)."""
    if isinstance(term, Sym):
        return term.width
    return max(1, term.bit_length()) if term >= 0 else None


def _at(term: Term, width: int) -> z3.BitVecRef:
    """The term as a ``width``-bit vector: exact, or congruent modulo 2^width (checked)."""
    if not isinstance(term, Sym):
        return z3.BitVecVal(term, width)
    have = term.width
    if width == have:
        return term.bv
    if width < have:
        return z3.Extract(width - 1, 0, term.bv)
    if not term.exact:
        raise SymbolicUnsupported("cannot widen a value known only modulo 2^width")
    return z3.ZeroExt(width - have, term.bv)


def _modulus(*terms: Term) -> int:
    """The width modulo which an inexact combination of ``terms`` is known."""
    inexact = [w for t in terms if not _is_exact(t) and (w := _width(t)) is not None]
    if inexact:
        return min(inexact)
    return max(w for t in terms if (w := _width(t)) is not None)


class Sym:
    """A Python integer as a Z3 bit-vector: exactly, or modulo ``2^width`` (module docstring)."""

    __slots__ = ("bv", "exact", "explorer")
    __hash__ = None  # type: ignore[assignment]  # == is symbolic

    def __init__(self, bv: z3.BitVecRef, exact: bool, explorer: Explorer) -> None:
        self.bv = bv
        self.exact = exact
        self.explorer = explorer

    @property
    def width(self) -> int:
        return int(self.bv.size())

    def __repr__(self) -> str:
        return f"Sym({self.bv}, {'exact' if self.exact else f'mod 2^{self.width}'})"

    def _new(self, bv: z3.BitVecRef, exact: bool) -> Sym:
        return Sym(bv, exact, self.explorer)

    @staticmethod
    def _check(other: object) -> Term:
        if isinstance(other, Sym) or (isinstance(other, int) and not isinstance(other, bool)):
            return other
        raise SymbolicUnsupported(f"cannot combine a symbolic integer with {type(other).__name__}")

    # Arithmetic -------------------------------------------------------------------------
    def _add(self, a: Term, b: Term) -> Sym:
        if _is_exact(a) and _is_exact(b):
            width = max(_width(a) or 1, _width(b) or 1) + 1
            return self._new(_at(a, width) + _at(b, width), True)
        width = _modulus(a, b)
        return self._new(_at(a, width) + _at(b, width), False)

    def _sub(self, a: Term, b: Term) -> Sym:
        if _is_exact(a) and _is_exact(b):
            width = max(_width(a) or 1, _width(b) or 1)
            diff = _at(a, width) - _at(b, width)
            never_negative = not self.explorer.feasible(z3.ULT(_at(a, width), _at(b, width)))
            return self._new(diff, never_negative)
        width = _modulus(a, b)
        return self._new(_at(a, width) - _at(b, width), False)

    def __add__(self, other: object) -> Sym:
        return self._add(self, self._check(other))

    def __radd__(self, other: object) -> Sym:
        return self._add(self._check(other), self)

    def __sub__(self, other: object) -> Sym:
        return self._sub(self, self._check(other))

    def __rsub__(self, other: object) -> Sym:
        return self._sub(self._check(other), self)

    # Bitwise ----------------------------------------------------------------------------
    def _and(self, a: Term, b: Term) -> Sym:
        exact_widths = [w for t in (a, b) if _is_exact(t) and (w := _width(t)) is not None]
        if exact_widths:  # x & m with 0 <= m < 2^w depends only on x mod 2^w
            width = min(exact_widths)
            return self._new(_at(a, width) & _at(b, width), True)
        width = _modulus(a, b)
        return self._new(_at(a, width) & _at(b, width), False)

    def _or(self, a: Term, b: Term) -> Sym:
        if _is_exact(a) and _is_exact(b):
            width = max(_width(a) or 1, _width(b) or 1)
            return self._new(_at(a, width) | _at(b, width), True)
        width = _modulus(a, b)
        return self._new(_at(a, width) | _at(b, width), False)

    def __and__(self, other: object) -> Sym:
        return self._and(self, self._check(other))

    def __rand__(self, other: object) -> Sym:
        return self._and(self._check(other), self)

    def __or__(self, other: object) -> Sym:
        return self._or(self, self._check(other))

    def __ror__(self, other: object) -> Sym:
        return self._or(self._check(other), self)

    def _shift_amount(self, other: object) -> int:
        if isinstance(other, bool) or not isinstance(other, int) or other < 0:
            raise SymbolicUnsupported("only shifts by a constant non-negative int are supported")
        return other

    def __lshift__(self, other: object) -> Sym:
        k = self._shift_amount(other)
        return self._new(z3.ZeroExt(k, self.bv) << k, self.exact) if k else self

    def __rshift__(self, other: object) -> Sym:
        k = self._shift_amount(other)
        return self._new(z3.LShR(self._exact_bv(), k), True)

    def _divisor(self, other: object) -> tuple[z3.BitVecRef, z3.BitVecRef]:
        if isinstance(other, bool) or not isinstance(other, int) or other <= 0:
            raise SymbolicUnsupported("only division by a constant positive int is supported")
        width = max(self.width, other.bit_length())
        return _at(self._exact_sym(), width), z3.BitVecVal(other, width)

    def __floordiv__(self, other: object) -> Sym:
        value, divisor = self._divisor(other)
        return self._new(z3.UDiv(value, divisor), True)

    def __mod__(self, other: object) -> Sym:
        value, divisor = self._divisor(other)
        return self._new(z3.URem(value, divisor), True)

    # Comparisons and truth --------------------------------------------------------------
    def _exact_sym(self) -> Sym:
        if not self.exact:
            raise SymbolicUnsupported(f"{self!r} may be negative: its order is unknown")
        return self

    def _exact_bv(self) -> z3.BitVecRef:
        return self._exact_sym().bv

    def _compare(self, other: object, op: Callable[[Any, Any], Any]) -> SymBool:
        term: Term = self._check(other)
        if not (_is_exact(self) and (isinstance(term, int) or _is_exact(term))):
            raise SymbolicUnsupported("comparison of a value known only modulo 2^width")
        widths = [self.width, term.width if isinstance(term, Sym) else abs(term).bit_length()]
        width = max(widths) + 1  # one spare bit: signed comparison of zero-extended values is exact
        return SymBool(op(_at(self, width), _at(term, width)), self.explorer)

    def __lt__(self, other: object) -> SymBool:
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other: object) -> SymBool:
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other: object) -> SymBool:
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other: object) -> SymBool:
        return self._compare(other, lambda a, b: a >= b)

    def __eq__(self, other: object) -> SymBool:  # type: ignore[override]
        return self._compare(other, lambda a, b: a == b)

    def __ne__(self, other: object) -> SymBool:  # type: ignore[override]
        return self._compare(other, lambda a, b: a != b)

    def __bool__(self) -> bool:
        return self.explorer.decide(self._exact_bv() != 0)

    def __index__(self) -> int:
        raise SymbolicUnsupported("a symbolic integer has no concrete value")


class SymBool:
    """The truth of a comparison between symbolic integers; ``bool()`` of it forks the path."""

    __slots__ = ("cond", "explorer")

    def __init__(self, cond: z3.BoolRef, explorer: Explorer) -> None:
        self.cond = cond
        self.explorer = explorer

    def __bool__(self) -> bool:
        return self.explorer.decide(self.cond)

    def __repr__(self) -> str:
        return f"SymBool({self.cond})"


def as_int(value: Sym) -> int:
    """Hand a :class:`Sym` to a model function typed ``int``: it implements the operators used."""
    return cast(int, value)


def as_bool(value: object) -> z3.BoolRef:
    """A function's boolean result as a Z3 formula (symbolic, or a constant on this path)."""
    if isinstance(value, SymBool):
        return value.cond
    if isinstance(value, bool):
        return z3.BoolVal(value)
    raise SymbolicUnsupported(f"expected a boolean result, got {type(value).__name__}")


def value_eq(a: object, b: object) -> z3.BoolRef:
    """``a == b`` as Python integers (both exact), as a Z3 formula."""
    for term in (a, b):
        if not isinstance(term, (Sym, int)) or isinstance(term, bool) or not _is_exact(term):
            raise SymbolicUnsupported(f"cannot compare {term!r} exactly")
    width = max(_width(a) or 1, _width(b) or 1)
    return _at(a, width) == _at(b, width)


# --------------------------------------------------------------------------------------
# Proof plumbing.

def _prove(name: str, prop: str, section: Citation, claim: z3.BoolRef,
           assumptions: Sequence[z3.BoolRef], inputs: Sequence[z3.BitVecRef]) -> ProofResult:
    """Proved when ``assumptions and not claim`` is unsat; otherwise report a counterexample."""
    solver = z3.Solver()
    solver.add(*assumptions)
    solver.add(z3.Not(claim))
    verdict = solver.check()
    if verdict == z3.unsat:
        return ProofResult(name, prop, section, True, None)
    if verdict == z3.sat:
        model = solver.model()
        example = {str(v): model.eval(v, model_completion=True).as_long() for v in inputs}
        return ProofResult(name, prop, section, False, example)
    return ProofResult(name, prop, section, False, None)  # unknown: not proved


def _pair(outcome: object) -> tuple[Any, Any]:
    """A path's outcome that the function under proof returns as a pair."""
    if not isinstance(outcome, tuple) or len(outcome) != 2:
        raise SymbolicUnsupported(f"expected a pair, got {outcome!r}")
    return outcome[0], outcome[1]


def _second(outcome: object) -> object:
    return _pair(outcome)[1]


def _no_errors(paths: Sequence[Path]) -> z3.BoolRef:
    """Every path that raised must be infeasible."""
    return z3.And(*[z3.Not(p.condition) for p in paths if p.error is not None])


# --------------------------------------------------------------------------------------
# 1. vring_need_event is the window test.

def prove_need_event_window(
    fn: Callable[[Any, Any, Any], object] = ring_index.vring_need_event,
) -> ProofResult:
    """``fn(event, new, old)`` is true exactly when event is one of old, old+1, ..., new-1 (mod 2^16)."""
    explorer = Explorer()
    event, new, old = explorer.var("event", 16), explorer.var("new", 16), explorer.var("old", 16)
    paths = explorer.explore(lambda: fn(event, new, old))
    k = z3.BitVec("k", 16)
    # The window [old, new) is the (new - old) mod 2^16 indices old + k for k < new - old.
    in_window = z3.Exists([k], z3.And(z3.ULT(k, new.bv - old.bv), old.bv + k == event.bv))
    claim = z3.And(_no_errors(paths), *[
        z3.Implies(p.condition, as_bool(p.outcome) == in_window) for p in paths if p.error is None
    ])
    return _prove(
        "vring_need_event.window",
        "vring_need_event(event, new, old) holds iff event lies in [old, new) modulo 2^16",
        sections.SPLIT_USED_SUPPRESSION, claim, [], [event.bv, new.bv, old.bv],
    )


# --------------------------------------------------------------------------------------
# 2. The split ring's in-flight bound is an invariant.

def device_consume(avail_idx: Any, last_avail_idx: Any, num: Any, k: Any) -> tuple[Any, Any] | None:
    """The device takes one chain, which it may only do when one is available."""
    if avail_idx == last_avail_idx:
        return None
    return avail_idx, ring_index.u16(last_avail_idx + 1)


def driver_publish(avail_idx: Any, last_avail_idx: Any, num: Any, k: Any) -> tuple[Any, Any] | None:
    """The driver makes ``k`` more chains available, legal only while at most ``num`` are in flight."""
    if ring_index.split_inflight(avail_idx, last_avail_idx) + k > num:
        return None
    return ring_index.u16(avail_idx + k), last_avail_idx


StepFn = Callable[[Any, Any, Any, Any], "tuple[Any, Any] | None"]

#: The moves of a split ring's two indices: (name, step, section). A step returns the new
#: ``(avail_idx, last_avail_idx)``, or None when the move is not allowed in that state.
SPLIT_STEPS: Final[tuple[tuple[str, StepFn, Citation], ...]] = (
    ("device_consume", device_consume, sections.SPLIT_AVAIL_RING),
    ("driver_publish", driver_publish, sections.SPLIT_AVAIL_RING),
)


def _power_of_two_queue_size(num: z3.BitVecRef) -> z3.BoolRef:
    """num is 2^p for some p with 2^p <= 32768: the split ring sizes (2.7)."""
    return z3.And(num != 0, num & (num - 1) == 0, z3.ULE(num, 32768))


def prove_inflight_step(name: str, step: StepFn, section: Citation) -> ProofResult:
    """``split_inflight <= num`` before a step implies it after the step."""
    num_bv = z3.BitVec("num", 32)
    assumptions = [_power_of_two_queue_size(num_bv)]
    explorer = Explorer(assumptions)
    avail, last = explorer.var("avail_idx", 16), explorer.var("last_avail_idx", 16)
    num, k = Sym(num_bv, True, explorer), explorer.var("k", 32)

    def run() -> tuple[object, object] | None:
        before = ring_index.split_inflight(as_int(avail), as_int(last)) <= num
        after = step(avail, last, num, k)
        if after is None:
            return None
        return before, ring_index.split_inflight(*after) <= num

    paths = explorer.explore(run)
    claim = z3.And(_no_errors(paths), *[
        z3.Implies(z3.And(p.condition, as_bool(p.outcome[0])), as_bool(p.outcome[1]))  # type: ignore[index]
        for p in paths if p.error is None and p.outcome is not None
    ])
    return _prove(
        f"split_inflight.{name}",
        f"(u16)(avail_idx - last_avail_idx) <= num is kept by {name}, for num a power of 2 <= 32768",
        section, claim, assumptions, [avail.bv, last.bv, num_bv, k.bv],
    )


def prove_split_inflight() -> list[ProofResult]:
    """The bound holds initially (both indices 0) and every step in :data:`SPLIT_STEPS` keeps it."""
    num_bv = z3.BitVec("num", 32)
    explorer = Explorer([_power_of_two_queue_size(num_bv)])
    initial = as_bool(ring_index.split_inflight(0, 0) <= Sym(num_bv, True, explorer))
    results = [_prove(
        "split_inflight.initial", "a fresh ring (both indices 0) has nothing in flight",
        sections.SPLIT_AVAIL_RING, initial, explorer.assumptions, [num_bv],
    )]
    results += [prove_inflight_step(name, step, section) for name, step, section in SPLIT_STEPS]
    return results


# --------------------------------------------------------------------------------------
# 3. The packed vring base round-trips.

_VRING_IOCTL: Final = sections.vhost_vdpa("vhost_vdpa_vring_ioctl")


def prove_packed_base() -> list[ProofResult]:
    """encode/decode of the packed ``vhost_vring_state.num`` are inverse bijections on their domains."""
    results = []

    # decode(encode(s)) == s for every state of 15-bit indices and 0/1 counters.
    fields = ("last_avail_idx", "last_avail_counter", "last_used_idx", "last_used_counter")
    names = [z3.BitVec(f, 32) for f in fields]
    assumptions = [z3.ULE(names[0], ring_index.PACKED_IDX_MASK), z3.ULE(names[1], 1),
                   z3.ULE(names[2], ring_index.PACKED_IDX_MASK), z3.ULE(names[3], 1)]
    explorer = Explorer(assumptions)
    syms = [Sym(v, True, explorer) for v in names]

    def there_and_back() -> tuple[object, ring_index.PackedVqState]:
        num = ring_index.encode_packed_base(ring_index.PackedVqState(*map(as_int, syms)))
        return num, ring_index.decode_packed_base(num)

    paths = explorer.explore(there_and_back)
    claim = z3.And(_no_errors(paths), *[
        z3.Implies(p.condition, z3.And(*[
            value_eq(getattr(_second(p.outcome), f), s) for f, s in zip(fields, syms, strict=True)
        ]))
        for p in paths if p.error is None
    ])
    results.append(_prove(
        "packed_base.decode_encode",
        "decode(encode(state)) == state for all 15-bit indices and 0/1 wrap counters",
        _VRING_IOCTL, claim, assumptions, names,
    ))

    # encode(decode(n)) == n for every 32-bit n.
    explorer = Explorer()
    num32 = explorer.var("num", 32)
    paths = explorer.explore(
        lambda: ring_index.encode_packed_base(ring_index.decode_packed_base(as_int(num32)))
    )
    claim = z3.And(_no_errors(paths), *[
        z3.Implies(p.condition, value_eq(p.outcome, num32)) for p in paths if p.error is None
    ])
    results.append(_prove(
        "packed_base.encode_decode", "encode(decode(n)) == n for every 32-bit n",
        _VRING_IOCTL, claim, [], [num32.bv],
    ))

    # decode accepts exactly the 32-bit values (checked over 64-bit inputs).
    explorer = Explorer()
    num64 = explorer.var("num", 64)
    paths = explorer.explore(lambda: ring_index.decode_packed_base(as_int(num64)))
    fits = z3.ULE(num64.bv, 0xFFFFFFFF)
    claim = z3.And(*[z3.Implies(p.condition, fits if p.error is None else z3.Not(fits)) for p in paths])
    results.append(_prove(
        "packed_base.domain", "decode_packed_base raises ValueError exactly for values past 32 bits",
        _VRING_IOCTL, claim, [], [num64.bv],
    ))
    return results


# --------------------------------------------------------------------------------------
# 4. The dirty log covers exactly the pages a write touches.

def prove_dirty_log_span(fn: Callable[[Any, Any], Any] = dirty_log.page_span) -> ProofResult:
    """Over 65-bit inputs (so 2^64 itself and everything past it is included).

    Valid writes (``addr + length <= 2^64``) return ``(first, end)`` such that page ``p`` is
    in ``[first, end)`` iff some byte ``b`` with ``addr <= b < addr + length`` has
    ``b // VHOST_PAGE_SIZE == p``; every other input raises ValueError.

    The "iff some byte" is proved in two quantifier-free halves, which together are exactly
    it: every byte of the write lies in a page of the span (for an arbitrary ``byte``), and
    every page of the span holds a byte of the write (the witness ``max(addr, page * 4096)``).
    """
    explorer = Explorer()
    addr, length = explorer.var("addr", 65), explorer.var("length", 65)
    paths = explorer.explore(lambda: fn(addr, length))
    wide = 80  # room for addr + length and page * VHOST_PAGE_SIZE without overflow
    size = z3.BitVecVal(dirty_log.VHOST_PAGE_SIZE, wide)
    a, n = z3.ZeroExt(wide - 65, addr.bv), z3.ZeroExt(wide - 65, length.bv)
    valid = z3.And(z3.ULT(a, 1 << 64), z3.ULE(a + n, 1 << 64))
    page, byte = z3.BitVec("page", wide), z3.BitVec("byte", wide)

    def in_write(b: z3.BitVecRef) -> z3.BoolRef:
        return z3.And(z3.ULE(a, b), z3.ULT(b, a + n))

    witness = z3.If(z3.ULT(a, page * size), page * size, a)
    obligations = []
    for p in paths:
        if p.error is not None:
            obligations.append(z3.Implies(p.condition, z3.Not(valid)))
            continue
        first, end = _pair(p.outcome)

        def in_span(q: z3.BitVecRef, first: Any = first, end: Any = end) -> z3.BoolRef:
            return z3.And(z3.ULE(_at(first, wide), q), z3.ULT(q, _at(end, wide)))

        obligations.append(z3.Implies(p.condition, z3.And(
            valid,
            z3.Implies(in_write(byte), in_span(z3.UDiv(byte, size))),
            z3.Implies(in_span(page), z3.And(in_write(witness), z3.UDiv(witness, size) == page)),
        )))
    return _prove(
        "dirty_log.page_span",
        "a write of (addr, len) marks exactly the 4 KiB pages holding one of its bytes; "
        "len 0 marks none, a write ending at 2^64 is valid, one past it is refused",
        dirty_log.LOG_WRITE, z3.And(*obligations), [], [addr.bv, length.bv, page, byte],
    )


def all_proofs() -> list[ProofResult]:
    """Every proof of this module, in the order of the brief."""
    return [
        prove_need_event_window(),
        *prove_split_inflight(),
        *prove_packed_base(),
        prove_dirty_log_span(),
    ]
