"""Dataset records on disk: an append-only JSONL that resumes with every record exactly once.

Each record carries a unique key: by default its integer `index` (the prompt's position in
the input); `FieldsKey(("index", "sample_index"))` makes a compound key. A run started again
on the same file reads the keys already there, cuts off a half-written last line (a run
killed mid-write), and appends only the missing records. A line is
written with a single `write` on an O_APPEND descriptor, so a killed process leaves at
most one partial line, which the next open removes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Iterator

from dual_sampling.errors import DataError


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the complete records of a JSONL file (a partial last line is skipped).

    Raises DataError naming the file and line on a complete line that is not JSON.
    """
    if not path.exists():
        return
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON record ({exc.msg}); the file "
                                f"was edited or corrupted: remove or fix that line.") from exc


@dataclass(frozen=True)
class FieldsKey:
    """A record's key from integer fields: an int for one name, a tuple of ints for several.

    `defaults` gives a field's value where a record lacks it (a file written before the
    field existed). A missing or non-integer field raises KeyError, TypeError or ValueError.
    """

    names: tuple[str, ...]
    defaults: tuple[tuple[str, int], ...] = ()

    def __call__(self, record: dict[str, Any]) -> Hashable:
        defaults = dict(self.defaults)
        values = tuple(int(record[n] if n in record or n not in defaults else defaults[n])
                       for n in self.names)
        return values[0] if len(values) == 1 else values

    def __str__(self) -> str:
        return ", ".join(self.names)


class ResumableJsonlWriter:
    """Exactly-once JSONL writer keyed by `key(record)` (default: the integer `index`).

    `done` holds the keys already on disk after opening. `write` refuses a key it has seen
    (a coordinator bug, never silently doubled). fsync runs at most every `fsync_every_s`
    seconds and at close, so a killed process loses nothing the kernel holds, and a power
    cut loses at most that window.
    """

    def __init__(self, path: Path, key: FieldsKey = FieldsKey(("index",)),
                 fsync_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.key = key
        self.key_name = str(key)
        self.fsync_every_s = fsync_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_partial_line()
        self.done: set[Hashable] = set()
        for number, record in enumerate(read_records(self.path), start=1):
            try:
                done = key(record)
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.path}:{number}: record without an integer "
                                f"`{self.key_name}`; this file was not written by "
                                f"dual_sampling: use a new output_dir.") from exc
            if done in self.done:
                raise DataError(f"{self.path}:{number}: `{self.key_name}`={done} appears "
                                f"twice; the file was edited by hand: remove the duplicate "
                                f"line.")
            self.done.add(done)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()

    def _truncate_partial_line(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb+") as fh:
            data = fh.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                fh.truncate(end)

    def write(self, record: dict[str, Any]) -> None:
        done = self.key(record)
        if done in self.done:
            raise DataError(f"{self.path}: record `{self.key_name}`={done} written twice.")
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):
            raise DataError(f"{self.path}: short write ({written} of {len(line)} bytes): "
                            f"is the disk full?")
        self.done.add(done)
        if time.monotonic() - self._last_sync >= self.fsync_every_s:
            os.fsync(self._fd)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResumableJsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


MESSAGES_FILE = "messages.jsonl"  # the samples as chat rows for supervised fine-tuning


def to_messages(record: dict[str, Any]) -> dict[str, Any]:
    """A samples.jsonl record as an SFT row that TRL's SFTTrainer reads as it is:
    `{"messages": [...theta's prompt as chat turns, {"role": "assistant", "content":
    completion}], ...}` with the sample's key, its importance weights, mean alpha, finish
    reason and the prompt row's other fields. theta's prompt, not the target's: the rows
    train the policy on what q* wrote after what the policy saw. A chat prompt keeps its
    turns (stored as their JSON); a text prompt becomes one user turn."""
    prompt = record.get("prompt", "")
    turns = None
    if isinstance(prompt, str) and prompt.startswith("["):
        try:
            parsed = json.loads(prompt)
            if isinstance(parsed, list) and all(isinstance(t, dict) and "role" in t
                                                for t in parsed):
                turns = parsed
        except ValueError:
            turns = None
    if turns is None:
        turns = [{"role": "user", "content": prompt}]
    return {"messages": [*turns, {"role": "assistant", "content": record["completion"]}],
            **{key: record.get(key) for key in ("index", "sample_index", "log_w_theta",
                                                 "log_w_target", "mean_alpha",
                                                 "finish_reason")},
            **(record.get("fields") or {})}
