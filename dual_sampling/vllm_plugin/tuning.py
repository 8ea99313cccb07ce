"""Tunings of vLLM's engine processes for a per-token loop; none changes outputs.

Loaded as a `vllm.general_plugins` entry point, which vLLM runs in every process of a server
(API server, engine core, workers) when `VLLM_PLUGINS` names `dual_sampling`.

The engine core and its workers talk through a shared-memory ring buffer
(`vllm/distributed/device_communicators/shm_broadcast.py`). After every read a reader polls
it with `sched_yield()` for `SpinCondition.busy_loop_s` (1 s, not configurable), then parks
on a zmq PUB/SUB notification that the writer can lose (`SNDHWM=1`); vLLM re-checks the ring
buffer only every 5 s (`SHM_READER_RECHECK_INTERVAL_MS`), so a lost notification stalls a
request for 5 s or more.

`DUAL_SAMPLING_SHM_MAX_PARK_S` (seconds, default 0.05; ON whenever the plugin is loaded):
the longest a parked reader sleeps before it re-checks the ring buffer itself, at most as
long as it has been idle (`cap_spin`). A lost notification then costs milliseconds, with
any spin length. 0 turns the bound off (vLLM's 5 s re-check; for comparisons only).

`DUAL_SAMPLING_SHM_SPIN_S` (seconds, unset: vLLM's 1 s): how long readers busy-wait. On a
GPU node each server owns its cores and the spin buys microseconds. Where servers share few
cores (two vLLM CPU servers on a small machine), one server's spinning processes take the
cores the other needs for its forward pass, and a loop that alternates between the two
servers every token slows down several times over (docs/benchmarks.md); start_vllm.sh
sets 1 ms for a `--cpu` theta/target pair and leaves a lone server's spin alone.

`DUAL_SAMPLING_INPUT_GAP_S` (seconds): when the engine core wakes from idle for new input,
keep reading its input queue until it has been quiet that long before it schedules a step.
A dual-sampling step sends one small request per session (vLLM makes each streaming-input
chunk its own engine-core message); without a gap the engine core starts stepping on the
first few that arrive and runs the rest in a second step, about two engine steps for each
coordinator step (measured). The gap costs that much latency per step after idle, and
nothing while the engine is busy.
"""
from __future__ import annotations

import logging
import os
import queue
import time

from dual_sampling.errors import ConfigError
from dual_sampling.vllm_plugin import compat, patches

SPIN_ENV = "DUAL_SAMPLING_SHM_SPIN_S"
GAP_ENV = "DUAL_SAMPLING_INPUT_GAP_S"
PARK_ENV = "DUAL_SAMPLING_SHM_MAX_PARK_S"
MAX_PARK_S = 0.05
"""Default of PARK_ENV: longest a parked shm reader waits before re-checking the ring buffer."""

logger = logging.getLogger(__name__)


def seconds_from_env(name: str) -> float | None:
    """A non-negative number of seconds from the environment, or None when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds (e.g. 0.001): fix or "
                          f"unset it in the environment of the vLLM server") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must be >= 0 seconds (or unset)")
    return value


def bounded_park_ms(idle_s: float, max_park: float, timeout_ms: int | None) -> int:
    """The timeout (ms) to hand vLLM's `SpinCondition.wait`: never more than `max_park`.

    `idle_s` is how long the reader has been past its spin (negative: still inside it).
    vLLM reads the clock again and decides itself whether to spin or park, so this bound is
    applied whatever the sign of `idle_s`: a reader this clock read puts inside the spin
    window may be past it by vLLM's read, and then parks on exactly this timeout (1 ms).
    """
    park_ms = max(1, int(1000 * min(max(idle_s, 0.001), max_park)))
    return park_ms if timeout_ms is None else min(timeout_ms, park_ms)


def cap_spin(limit: float | None, max_park: float = MAX_PARK_S) -> None:
    """Spin at most `limit` s after a read (None: vLLM's own spin), then park for a bounded time.

    vLLM's writer wakes a parked reader with a zmq PUB/SUB notification that can be lost
    (vLLM bounds the damage by re-checking the ring buffer every 5 s); with a short spin a
    reader is often parked when it matters, and a lost notification stalled whole requests
    for 5, 10 or 25 s. So a parked reader re-checks after at most as long as it has already
    been idle (1 ms at least, `max_park` s at most), and every call gets that bound, not
    only the calls this wrapper's own clock read puts past the spin (`bounded_park_ms`:
    vLLM reads the clock again, and an earlier version that bounded only `idle_s > 0` left
    vLLM's 5 s timeout to readers that crossed the spin boundary between the two reads,
    which back-to-back requests did all the time): a lost notification costs about one
    step's time while busy, `max_park` after idling, and an idle reader wakes 1 / `max_park`
    times a second (0.06 CPU-s per 5 s idle, for a whole server, measured). `max_park` = 0
    leaves the park unbounded: the stalling old cap, kept only so that benchmarks and tests
    can show the difference.
    """
    if not compat.usable("shm_spin_cap"):
        return
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    def make(original):
        def wait(self, timeout_ms: int | None = None) -> None:
            if limit is not None and self.busy_loop_s > limit:  # readers made before this hook too
                self.busy_loop_s = limit
            if max_park > 0:
                timeout_ms = bounded_park_ms(time.monotonic() - self.last_read - self.busy_loop_s,
                                             max_park, timeout_ms)
            return original(self, timeout_ms)
        return wait

    patches.replace(SpinCondition, "wait", make, feature="shm_spin_cap", setting=(limit, max_park))


def gather_input(gap: float) -> None:
    if not compat.usable("input_gap"):
        return
    from vllm.v1.engine.core import EngineCoreProc

    def make(original):
        def _process_input_queue(self) -> None:
            was_idle = not self.has_work()
            original(self)
            if not was_idle:
                return
            while True:  # woke for new input: take what follows within `gap`
                try:
                    request = self.input_queue.get(timeout=gap)
                except queue.Empty:
                    return
                self._handle_client_request(*request)
        return _process_input_queue

    patches.replace(EngineCoreProc, "_process_input_queue", make, feature="input_gap",
                    setting=gap)


def register() -> None:
    """The `vllm.general_plugins` hook: the park bound always, the spin cap and gap when set."""
    limit, gap = seconds_from_env(SPIN_ENV), seconds_from_env(GAP_ENV)
    max_park = seconds_from_env(PARK_ENV)
    max_park = MAX_PARK_S if max_park is None else max_park
    if limit is not None or max_park > 0:
        cap_spin(limit, max_park)
    if gap:
        gather_input(gap)
    logger.debug("dual_sampling tuning in pid %d: spin cap %s s, park bound %s s, input gap "
                 "%s s", os.getpid(), limit, max_park, gap)
