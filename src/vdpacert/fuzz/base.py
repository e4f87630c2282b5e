"""What every fuzzer is: a name, one-input function, seeds, and the invariants it checks.

A fuzzer never trusts the engine to tell a bug from an expected refusal: the one-input function
itself catches the typed errors the component is allowed to answer with (an ``OSError`` carrying a
Linux errno, a named exception such as ``StateError``) and checks that nothing changed; anything
else it lets through as a crash, and a check that fails raises :class:`InvariantBroken`.

Inputs are decoded with :class:`ByteReader`, which never fails: when the bytes run out it reads
zeros, so every byte string is a valid input and a mutation engine cannot waste executions on
inputs the decoder refuses (libFuzzer's FuzzedDataProvider makes the same choice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["ByteReader", "Fuzzer", "InvariantBroken"]

T = TypeVar("T")


class InvariantBroken(AssertionError):
    """An input made the component break an invariant; ``invariant`` names it (e.g. ``rings.write_outside``)."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass(frozen=True)
class Fuzzer:
    """One fuzz target.

    ``one_input`` runs one input (any bytes) and returns normally when every invariant held;
    ``seeds`` builds well-formed starting inputs (the corpus files shipped beside the package add
    to them); ``invariants`` lists the names :class:`InvariantBroken` may carry, for the docs and
    the report; ``setup`` (optional) builds the long-lived state once per process, before the
    first input, so executions do not pay for it.
    """

    name: str
    description: str
    one_input: Callable[[bytes], None]
    seeds: Callable[[], Sequence[bytes]]
    invariants: tuple[str, ...]
    setup: Callable[[], None] | None = field(default=None)


class ByteReader:
    """Reads typed values off the front of a byte string; zeros once it is used up."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    @property
    def remaining(self) -> int:
        return max(0, len(self._data) - self._at)

    def take(self, count: int) -> bytes:
        """``count`` bytes (zero-padded past the end)."""
        chunk = bytes(self._data[self._at:self._at + count])
        self._at += count
        return chunk + bytes(count - len(chunk))

    def uint(self, size: int) -> int:
        """An unsigned little-endian integer of ``size`` bytes."""
        return int.from_bytes(self.take(size), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def below(self, bound: int) -> int:
        """An integer in ``[0, bound)`` (``bound`` >= 1), from as few bytes as cover it."""
        if bound < 1:
            raise ValueError(f"bound must be at least 1, not {bound}")
        size = max(1, (bound - 1).bit_length() + 7 >> 3)
        return self.uint(size) % bound

    def between(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        return low + self.below(high - low + 1)

    def pick(self, choices: Sequence[T]) -> T:
        return choices[self.below(len(choices))]
