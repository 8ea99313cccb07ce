"""No request waits on a missed wake-up: latency on the real servers that start_vllm.sh starts.

start_vllm.sh --cpu caps vLLM's shm spin on server pairs (tuning.py). A reader past its spin
parks on a notification that vLLM can lose; unbounded, the park lasts until vLLM's 5 s
re-check, and requests took 5, 10, 15 or 25 s instead of 0.2 s. Requests here come back to
back (no pause: a reader's clock reads straddle the end of its 1 ms spin, the case the
2026-11-30 cap missed) and with short random gaps (0-5 ms: around the spin's end), 60 of
each; none may wait on vLLM's 5 s re-check.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.coordinator import Coordinator
from dual_sampling.core.transports.session import SessionTransport
from helpers import clients, corpus_prompts, prompt_items, settings

CALLS = 60
MAX_GAP_S = 0.005


async def timed(call) -> dict[str, list[float]]:
    """Seconds per call: CALLS back to back, then CALLS with random gaps in [0, MAX_GAP_S]."""
    gaps = random.Random(0)
    times: dict[str, list[float]] = {"back to back": [], "random gaps": []}
    for kind, times_of_kind in times.items():
        for _ in range(CALLS):
            started = time.perf_counter()
            await call()
            times_of_kind.append(time.perf_counter() - started)
            if kind == "random gaps":
                await asyncio.sleep(gaps.uniform(0, MAX_GAP_S))
    return times


STALL_S = 4.5
"""Below vLLM's 5 s re-check: a request that waited on it takes longer. The suite's other
servers share the 2 cores, so the benchmark (experiments/bench_tuning.py), not this test,
holds the 1 s / 3x-median target: in a full CI run slow-but-unstalled requests passed 1 s."""


def assert_no_stall(times: dict[str, list[float]], what: str) -> None:
    for kind, seconds in times.items():
        median = statistics.median(seconds)
        summary = (f"{what}, {kind}: max {max(seconds):.3f} s, median {median:.3f} s over "
                   f"{len(seconds)} (slowest: {sorted(seconds)[-5:]})")
        assert max(seconds) < STALL_S, summary


async def generation_times(url: str, model: str) -> dict[str, list[float]]:
    async with VLLMClient(url, name=model) as client:
        body = {"model": model, "prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 64,
                "ignore_eos": True, "logprobs": 20}
        await client.request("POST", "/v1/completions", body)  # warm
        return await timed(lambda: client.request("POST", "/v1/completions", body))


@pytest.mark.server
def test_generation_requests_never_stall(servers):
    assert_no_stall(asyncio.run(generation_times(servers.url("theta"), "theta")),
                    "single-prompt /v1/completions, 64 tokens, theta of a pair")


@pytest.mark.server
def test_fused_generation_requests_never_stall(fused_server):
    assert_no_stall(asyncio.run(generation_times(fused_server.url("fused"), "fused")),
                    "single-prompt /v1/completions, 64 tokens, fused server")


@pytest.mark.server
def test_topk_requests_never_stall(servers):
    async def go() -> dict[str, list[float]]:
        async with VLLMClient(servers.url("theta"), name="theta") as client:
            sequence = (await corpus_prompts(client, lengths=(200,)))[0]
            await client.prompt_topk([sequence], 20)
            return await timed(lambda: client.prompt_topk([sequence], 20))

    assert_no_stall(asyncio.run(go()), "single-sequence /v1/topk")


@pytest.mark.server
def test_session_transport_runs_never_stall(servers):
    """Whole dual-sampling runs (2 prompts x 8 tokens through resident sessions), one after
    another: every step of each run alternates between the two servers' readers."""
    async def go() -> dict[str, list[float]]:
        theta, target = clients(servers)
        async with theta, target:
            prompts = (await corpus_prompts(theta))[:2]
            async with SessionTransport(theta, target) as transport:
                async def run() -> None:
                    await Coordinator(transport, settings(2, 8, 1024), _discard).run(
                        prompt_items(prompts))
                await run()  # warm
                return await timed(run)

    assert_no_stall(asyncio.run(go()), "session-transport runs, 2 prompts x 8 tokens")


async def _discard(seq) -> None:
    return None
