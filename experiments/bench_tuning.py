"""What the engine tunings of dual_sampling/vllm_plugin/tuning.py buy, side by side.

    python experiments/bench_tuning.py [--batches 32] [--tokens 64] [--repeats 2]

Starts two theta/target pairs of vLLM CPU servers with start_vllm.sh: one stock (both
tunings off: DUAL_SAMPLING_SHM_SPIN_S= DUAL_SAMPLING_INPUT_GAP_S=) and one with
start_vllm.sh's defaults (shared-memory spin capped at 1 ms, 0.5 ms input gap). Then, taking
turns between the pairs in each repeat, it measures dual sampling through each transport
and counts the theta engine's steps per generated token (vLLM's
`vllm:iteration_tokens_total` counter; 1.0 is one engine step per coordinator step).
Prints one table with the tuned / stock ratios.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from dual_sampling.client import VLLMClient
from dual_sampling.launch import ENGINE_STEPS, Servers, server_metrics
from dual_sampling.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.transports.request import RequestTransport
from dual_sampling.transports.session import SessionTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import PROMPT_TOKENS, dual_tok_s, speed_arguments  # noqa: E402

STOCK = {"DUAL_SAMPLING_SHM_SPIN_S": "", "DUAL_SAMPLING_INPUT_GAP_S": ""}


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
    return {"request": request, "session": session, "steps": steps}


def main() -> None:
    args = speed_arguments(__doc__, batches="32", repeats=2).parse_args()
    models = ensure_tiny_models()
    pairs = {"stock": Servers(Path(tempfile.mkdtemp(prefix="bench_tuning_stock_")), models,
                              env=STOCK),
             "tuned": Servers(Path(tempfile.mkdtemp(prefix="bench_tuning_tuned_")), models)}
    load_before = os.getloadavg()[0]
    rows = []
    try:
        for pair in pairs.values():
            pair.start("theta", "target")
        for batch in [int(b) for b in args.batches.split(",")]:
            best = {name: {"request": 0.0, "session": 0.0, "steps": float("inf")}
                    for name in pairs}
            for pair in pairs.values():  # warm-up
                asyncio.run(measure(pair, batch, 4, args.top_k))
            for _ in range(args.repeats):
                for name, pair in pairs.items():
                    got = asyncio.run(measure(pair, batch, args.tokens, args.top_k))
                    best[name] = {"request": max(best[name]["request"], got["request"]),
                                  "session": max(best[name]["session"], got["session"]),
                                  "steps": min(best[name]["steps"], got["steps"])}
            stock, tuned = best["stock"], best["tuned"]
            rows.append([batch, f"{stock['request']:.0f}", f"{tuned['request']:.0f}",
                         f"{tuned['request'] / stock['request']:.2f}x",
                         f"{stock['session']:.0f}", f"{tuned['session']:.0f}",
                         f"{tuned['session'] / stock['session']:.2f}x",
                         f"{stock['steps']:.2f}", f"{tuned['steps']:.2f}"])
    finally:
        for pair in pairs.values():
            pair.stop()
    print(f"\n### Engine tunings: stock vs tuned vLLM CPU server pairs (top_k={args.top_k}, "
          f"{args.tokens} tokens per prompt, best of {args.repeats}; {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print(tabulate(rows, headers=["prompts", "request stock tok/s", "request tuned tok/s",
                                  "request tuned / stock", "session stock tok/s",
                                  "session tuned tok/s", "session tuned / stock",
                                  "engine steps per token, stock",
                                  "engine steps per token, tuned"], tablefmt="github"))


if __name__ == "__main__":
    main()
