"""One run per output_dir at a time: an OS file lock held for the whole run.

    with run_lock(output_dir):   # ConfigError at once if another run holds it
        ...

The lock is `output_dir/.run.lock` (filelock's fcntl lock): the OS drops it when the holding
process exits, however it exits (SIGKILL and node loss included), so a requeued or re-run
job never waits on a stale lock. `output_dir/.run.owner` says who holds it, for the message.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from dual_sampling.errors import ConfigError

LOCK_FILE = ".run.lock"
OWNER_FILE = ".run.owner"


@contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold output_dir's run lock; ConfigError naming the dir and its holder if it is taken."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = (out / OWNER_FILE).read_text().strip() if (out / OWNER_FILE).is_file() else "?"
        raise ConfigError(
            f"output_dir {out} is in use by another run ({owner}): two runs writing one "
            f"dataset would double its records. Wait for that run to end, stop it, or give "
            f"another output_dir.") from None
    try:
        (out / OWNER_FILE).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        lock.release()
