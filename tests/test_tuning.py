"""The vLLM engine tunings of dual_sampling/vllm_plugin/tuning.py.

Pure: the patches' logic on vLLM's own classes (each test restores them). Real servers:
start_vllm.sh turns them on, and a dual-sampling step costs the engine one step, not two.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.errors import ConfigError
from dual_sampling.serving.launch import ENGINE_STEPS, server_metrics
from dual_sampling.vllm_plugin import tuning
from helpers import clients, corpus_prompts, run_coordinator, settings


def test_seconds_from_env_names_the_variable(monkeypatch):
    monkeypatch.delenv(tuning.GAP_ENV, raising=False)
    assert tuning.seconds_from_env(tuning.GAP_ENV) is None
    monkeypatch.setenv(tuning.GAP_ENV, " 0.002 ")
    assert tuning.seconds_from_env(tuning.GAP_ENV) == 0.002
    for bad in ("fast", "-1"):
        monkeypatch.setenv(tuning.GAP_ENV, bad)
        with pytest.raises(ConfigError, match=tuning.GAP_ENV):
            tuning.seconds_from_env(tuning.GAP_ENV)


class _IdleEngine:
    """What EngineCoreProc._process_input_queue reads, with requests that arrive later."""

    def __init__(self) -> None:
        self.input_queue: queue.Queue = queue.Queue()
        self.aborts_queue: queue.Queue = queue.Queue()
        self.process_input_queue_block = True
        self.handled: list[int] = []

    def has_work(self) -> bool:
        return bool(self.handled)

    def is_running(self) -> bool:
        return True

    def _notify_idle_state_callbacks(self) -> None:
        pass

    def _handle_client_request(self, kind, request) -> None:
        self.handled.append(request)


def _feed(engine: _IdleEngine, delays: list[float]) -> threading.Thread:
    def run() -> None:
        for i, delay in enumerate(delays):
            time.sleep(delay)
            engine.input_queue.put(("ADD", i))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_input_gap_gathers_a_burst_into_one_engine_step(monkeypatch):
    from vllm.v1.engine.core import EngineCoreProc
    stock_method = EngineCoreProc._process_input_queue
    monkeypatch.setattr(EngineCoreProc, "_process_input_queue", stock_method)  # restored after
    burst = [0.0] + [0.002] * 7 + [0.5]  # 8 close together, then one after a pause

    stock = _IdleEngine()
    thread = _feed(stock, burst)
    EngineCoreProc._process_input_queue(stock)
    assert len(stock.handled) < 8  # vLLM steps on what has arrived: the burst is split
    thread.join()

    tuning.gather_input(0.05)
    tuning.gather_input(0.05)  # vLLM may load a plugin twice: still one wrapper
    assert EngineCoreProc._process_input_queue._dual_sampling_original is stock_method
    gathered = _IdleEngine()
    thread = _feed(gathered, burst)
    EngineCoreProc._process_input_queue(gathered)
    assert gathered.handled == list(range(8))  # the whole burst, not the late one
    thread.join()

    busy = _IdleEngine()  # an engine that already has work does not wait
    busy.handled.append(-1)
    started = time.monotonic()
    EngineCoreProc._process_input_queue(busy)
    assert time.monotonic() - started < 0.05


def test_spin_cap_applies_to_existing_readers_and_bounds_the_park(monkeypatch, tmp_path):
    """Past the capped spin a reader sleeps on its notify socket, but never longer than it
    has been idle (and `max_park`): a lost notification then costs milliseconds, where the
    stock 5 s re-check stalled requests for 5-20 s."""
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)
    context = zmq.Context()
    try:
        reader = SpinCondition(is_reader=True, context=context,
                               notify_address=f"ipc://{tmp_path}/notify")
        assert reader.busy_loop_s == 1
        stock_wait = SpinCondition.wait
        tuning.cap_spin(0.001, max_park=0.05)
        tuning.cap_spin(0.001, max_park=0.05)
        assert SpinCondition.wait._dual_sampling_original is stock_wait
        reader.record_read()
        time.sleep(0.01)
        started = time.monotonic()
        reader.wait(timeout_ms=2000)  # no notification ever comes (a lost one)
        assert reader.busy_loop_s == 0.001
        assert 0.005 <= time.monotonic() - started < 0.03  # parked about as long as idle
        time.sleep(0.2)
        started = time.monotonic()
        reader.wait(timeout_ms=None)  # long idle: parks max_park, not forever
        assert 0.04 <= time.monotonic() - started < 0.2
    finally:
        context.destroy(linger=0)


class _Reader:
    """What the spin cap's wrapper reads of a SpinCondition reader."""

    def __init__(self, last_read: float) -> None:
        self.last_read = last_read
        self.busy_loop_s = 1.0


@pytest.mark.parametrize("spin_env", ["0.001", None])
def test_spin_cap_bounds_every_park_across_the_spin_boundary(monkeypatch, spin_env):
    """vLLM's `wait` reads the clock after the wrapper does: whatever side of the spin window
    the wrapper's read falls on, the timeout vLLM gets is never longer than the park bound.
    The earlier cap bounded only readers its own read put past the window, and handed vLLM's
    5 s re-check to one whose two reads straddled it (idle_s = -2.25e-07 in a stall's dump).
    The bound is on whenever the plugin loads, with the 1 ms spin of a CPU pair or with
    vLLM's own 1 s spin (a lone server, GPU servers)."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    received: list[int | None] = []
    monkeypatch.setattr(SpinCondition, "wait",
                        lambda self, timeout_ms=None: received.append(timeout_ms))
    monkeypatch.delenv(tuning.PARK_ENV, raising=False)
    monkeypatch.delenv(tuning.GAP_ENV, raising=False)
    if spin_env is None:
        monkeypatch.delenv(tuning.SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(tuning.SPIN_ENV, spin_env)
    tuning.register()
    spin = 1.0 if spin_env is None else float(spin_env)
    clock = iter([])
    monkeypatch.setattr(tuning.time, "monotonic", lambda: next(clock))
    reader = _Reader(last_read=100.0)
    offsets = [-1e-3, -2.25e-7, -1e-9, 0.0, 1e-9, 2.25e-7, 5e-4, 1e-2, 10.0, 1e4]
    for offset in offsets:
        for vllm_timeout in (None, 5000, 0, 20):
            clock = iter([reader.last_read + spin + offset])
            SpinCondition.wait(reader, timeout_ms=vllm_timeout)
            assert received[-1] is not None, (offset, vllm_timeout)
            assert received[-1] <= 1000 * tuning.MAX_PARK_S, (offset, vllm_timeout, received[-1])
            if vllm_timeout is not None:
                assert received[-1] <= vllm_timeout  # never longer than vLLM asked either
    assert reader.busy_loop_s == spin


@pytest.mark.server
def test_one_engine_step_per_dual_sampling_step(servers):
    """8 sessions, 24 tokens each: the stock engine split most steps in two (measured
    1.7x to 2x engine steps per coordinator step); the input gap makes it one."""
    async def go() -> None:
        theta, target = clients(servers)
        async with theta, target:
            prompts = (await corpus_prompts(theta))[:4] * 2
            before = {role: server_metrics(servers.url(role), ENGINE_STEPS)[0]
                      for role in ("theta", "target")}
            async with SessionTransport(theta, target) as transport:
                await run_coordinator(transport, prompts, settings(8, 24, 1024))
            after = {role: server_metrics(servers.url(role), ENGINE_STEPS)[0]
                     for role in ("theta", "target")}
        for role in after:
            steps = after[role] - before[role]
            assert 24 <= steps <= 1.4 * 24, f"{role}: {steps} engine steps for 24 tokens"

    asyncio.run(go())
