"""What one patched vLLM method leaves for the next in the same engine step.

A patched method takes vLLM's arguments only, so per-step data it computes for a later one
(the fused model's logits for the sampler, the verify step's seeds for the draft's draws)
cannot travel as an argument. It goes through a `HandOff`: put with the number of batch rows
it is for, taken by a reader that says how many rows it has. A value for another batch (a
dummy or warm-up run in between, a step vLLM skipped) is never handed over, and a value
taken once (`take`) is gone, so a stale one cannot reach a later step.
"""
from __future__ import annotations

from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class HandOff(Generic[T]):
    """One value for a batch of `rows`; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._value: Optional[T] = None
        self._rows = -1
        self.refused = 0  # reads whose batch was not the value's (dummy runs and the like)

    def put(self, value: T, rows: int) -> None:
        self._value, self._rows = value, int(rows)

    def take(self, rows: int) -> Optional[T]:
        """The value if it is for `rows` rows, else None; either way it is gone."""
        value = self.peek(rows)
        self._value, self._rows = None, -1
        return value

    def peek(self, rows: int) -> Optional[T]:
        """The value if it is for `rows` rows (it stays for the next read), else None."""
        if self._value is None:
            return None
        if self._rows != rows:
            self.refused += 1
            return None
        return self._value
