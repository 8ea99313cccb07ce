"""What the engine tunings of dual_sampling/vllm_plugin/tuning.py buy, side by side.

    python experiments/bench_tuning.py [--batches 32] [--tokens 64] [--repeats 2]

Starts three theta/target pairs of vLLM CPU servers with start_vllm.sh: stock (both tunings
off: DUAL_SAMPLING_SHM_SPIN_S= DUAL_SAMPLING_INPUT_GAP_S=), the old spin cap (1 ms spin,
then parked until vLLM's 5 s re-check: DUAL_SAMPLING_SHM_MAX_PARK_S=0) and start_vllm.sh's
defaults (1 ms spin, park bounded by the idle time and 50 ms, 0.5 ms input gap), one pair
after the other (six servers do not fit this machine's memory). For each it measures dual
sampling through each transport, counts the theta engine's steps per generated token
(vLLM's `vllm:iteration_tokens_total` counter; 1.0 is one engine step per coordinator
step), and times 20 single-prompt generation requests (64 tokens, logprobs=20) sent one at
a time with 0.1 s idle between: the stall a lost wake-up causes shows in their maximum.
Prints one table with ratios to stock.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import tempfile
from pathlib import Path

from tabulate import tabulate

from dual_sampling.client import VLLMClient
from dual_sampling.coordinator import RequestTransport
from dual_sampling.launch import ENGINE_STEPS, Servers, server_metrics
from dual_sampling.session_transport import SessionTransport
from dual_sampling.tiny_models import corpus_path, ensure_tiny_models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import PROMPT_TOKENS, dual_tok_s, speed_arguments  # noqa: E402

SETTINGS = {"stock": {"DUAL_SAMPLING_SHM_SPIN_S": "", "DUAL_SAMPLING_INPUT_GAP_S": ""},
            "old cap": {"DUAL_SAMPLING_SHM_MAX_PARK_S": "0"},
            "tuned": {}}
LATENCY_REQUESTS = 20


async def single_request_latency(theta: VLLMClient) -> list[float]:
    """Seconds per single-prompt request, one at a time with idle gaps (when readers park)."""
    body = {"model": "theta", "prompt": list(range(5, 37)), "max_tokens": 64,
            "ignore_eos": True, "logprobs": 20}
    times = []
    for _ in range(LATENCY_REQUESTS):
        started = time.perf_counter()
        await theta.request("POST", "/v1/completions", body)
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.1)
    return times


async def measure(pair: Servers, batch: int, n_tokens: int, top_k: int) -> dict[str, float]:
    async with VLLMClient(pair.url("theta"), name="theta", timeout_s=600) as theta, \
            VLLMClient(pair.url("target"), name="target", timeout_s=600) as target:
        ids = await theta.tokenize(corpus_path().read_text()[:20000])
        prompts = [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(batch)]
        request = (await dual_tok_s(RequestTransport(theta, target), prompts, n_tokens,
                                    top_k))[0]
        async with SessionTransport(theta, target, timeout_s=600) as sessions:
            before = server_metrics(theta.url, ENGINE_STEPS)[0]
            session = (await dual_tok_s(sessions, prompts, n_tokens, top_k))[0]
            steps = (server_metrics(theta.url, ENGINE_STEPS)[0] - before) / n_tokens
        latency = await single_request_latency(theta)
    return {"request": request, "session": session, "steps": steps,
            "latency_median": statistics.median(latency), "latency_max": max(latency)}


def best_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Fastest throughput and fewest steps over repeats; latencies over all repeats (worst max)."""
    return {"request": max(r["request"] for r in runs), "session": max(r["session"] for r in runs),
            "steps": min(r["steps"] for r in runs),
            "latency_median": statistics.median(r["latency_median"] for r in runs),
            "latency_max": max(r["latency_max"] for r in runs)}


def main() -> None:
    args = speed_arguments(__doc__, batches="32", repeats=2).parse_args()
    models = ensure_tiny_models()
    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    runs: dict[tuple[int, str], list] = {}
    for name, env in SETTINGS.items():  # one pair up at a time: six servers do not fit 24 GiB
        pair = Servers(Path(tempfile.mkdtemp(prefix="bench_tuning_")), models, env=env)
        try:
            pair.start("theta", "target")
            for batch in batches:
                asyncio.run(measure(pair, batch, 4, args.top_k))  # warm-up
                runs[batch, name] = [asyncio.run(measure(pair, batch, args.tokens, args.top_k))
                                     for _ in range(args.repeats)]
        finally:
            pair.stop()
    rows = []
    for batch in batches:
        stock = best_of(runs[batch, "stock"])
        for name in SETTINGS:
            got = best_of(runs[batch, name])
            rows.append([batch, name, f"{got['request']:.0f}",
                         f"{got['request'] / stock['request']:.2f}x",
                         f"{got['session']:.0f}", f"{got['session'] / stock['session']:.2f}x",
                         f"{got['steps']:.2f}", f"{got['latency_median']:.3f}",
                         f"{got['latency_max']:.3f}"])
    print(f"\n### Engine tunings: stock, old spin cap and tuned vLLM CPU server pairs "
          f"(top_k={args.top_k}, {args.tokens} tokens per prompt, best of {args.repeats}; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print(tabulate(rows, headers=["prompts", "servers", "request tok/s", "request / stock",
                                  "session tok/s", "session / stock",
                                  "engine steps per token",
                                  f"single request s, median of {LATENCY_REQUESTS}",
                                  "single request s, max"], tablefmt="github"))


if __name__ == "__main__":
    main()
