"""Dataset records on disk: an append-only JSONL that resumes with every record exactly once.

Each record carries a unique integer `index` (the prompt's position in the input). A run
started again on the same file reads the indices already there, cuts off a half-written
last line (a run killed mid-write), and appends only the missing records. A line is
written with a single `write` on an O_APPEND descriptor, so a killed process leaves at
most one partial line, which the next open removes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from dual_sampling.errors import DataError


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the complete records of a JSONL file (a partial last line is skipped)."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return
            yield json.loads(line)


class ResumableJsonlWriter:
    """Exactly-once JSONL writer keyed by `index`.

    `done` holds the indices already on disk after opening. `write` refuses an index it
    has seen (a coordinator bug, never silently doubled). fsync runs at most every
    `fsync_every_s` seconds and at close, so a killed process loses nothing the kernel
    holds, and a power cut loses at most that window.
    """

    def __init__(self, path: Path, key: str = "index", fsync_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync_every_s = fsync_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_partial_line()
        self.done: set[int] = set()
        for number, record in enumerate(read_records(self.path), start=1):
            try:
                index = int(record[key])
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.path}:{number}: record without an integer `{key}`; "
                                f"this file was not written by dual_sampling: use a new "
                                f"output_dir.") from exc
            if index in self.done:
                raise DataError(f"{self.path}:{number}: `{key}`={index} appears twice; the "
                                f"file was edited by hand: remove the duplicate line.")
            self.done.add(index)
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
        index = int(record[self.key])
        if index in self.done:
            raise DataError(f"{self.path}: record `{self.key}`={index} written twice.")
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):
            raise DataError(f"{self.path}: short write ({written} of {len(line)} bytes): "
                            f"is the disk full?")
        self.done.add(index)
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
