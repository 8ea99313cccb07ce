"""Dual sampling against native vLLM generation, and the top-k approximation error.

    python experiments/bench_sample.py                     # starts its own CPU servers
    python experiments/bench_sample.py --theta-url U --target-url V --models DIR

Prints, from one run: (1) tokens/s of dual sampling (request transport) and of one
server's native generation for the same prompts (1 and 32 prompts, 64 tokens each) and
their ratio, with the share of the coordinator's wall time spent outside awaiting the
servers (target < 10%); (2) for k = 5, 20, 50, 100, the error of alpha* and q* computed
from the two top-k lists against the exact full-vocabulary values (transformers, same
weights): mean |alpha_k - alpha_full|, total variation TV(q_full, q_k), the q_full mass
outside the candidate set, and KL(q_full || q_k) on the candidates (q_full renormalised
there; outside the candidates q_k is 0, so the full KL is infinite whenever that mass > 0).
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.coordinator import (Coordinator, PromptItem, SampleSettings,
                                       Transport)
from dual_sampling.core.transports.request import RequestTransport
from dual_sampling.models.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.serving.launch import Servers

PROMPT_TOKENS = 32


async def prompt_items(tokens: list[list[int]]):
    for i, ids in enumerate(tokens):
        yield PromptItem(i, "", ids)


async def fused_run(fused: VLLMClient, prompts: list[list[int]], n_tokens: int,
                    alpha: float | None = None) -> tuple[float, float, dict[str, float]]:
    """The fused route as sample mode drives it (FusedCoordinator, every prompt in flight,
    `n_tokens` each, EOS ignored; `alpha` None: alpha* per token): (tokens/s, wall seconds,
    the change of the worker's counters over the run)."""
    from dual_sampling.wire.fused_format import COUNTERS_PATH
    from dual_sampling.core.transports.fused import FusedCoordinator, FusedSettings

    async def keep(_seq) -> None:
        return None

    settings = FusedSettings(max_tokens=n_tokens, alpha=alpha, concurrency=len(prompts),
                             max_model_len=2048, ignore_eos=True)
    coordinator = FusedCoordinator(fused, settings, keep)
    before = await fused.request("GET", COUNTERS_PATH)
    started = time.perf_counter()
    await coordinator.run(prompt_items(prompts))
    elapsed = time.perf_counter() - started
    after = await fused.request("GET", COUNTERS_PATH)
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
    return coordinator.tokens_generated / elapsed, elapsed, delta


async def native_tok_s(client: VLLMClient, prompts: list[list[int]], n_tokens: int,
                       logprobs: int | None = None, seed: int | None = 0) -> float:
    """One server generating `n_tokens` for every prompt in one request (vLLM's own loop);
    `logprobs=k` also returns each generated token's top k, as dual sampling needs.
    `seed=None` samples with the engine's shared generator (vLLM CPU 0.32 crashes a seeded
    request whose prompt is prefilled in chunks: "CPU Generator does not use offset")."""
    body = {"prompt": prompts, "max_tokens": n_tokens, "min_tokens": n_tokens,
            "ignore_eos": True, "temperature": 1.0}
    if seed is not None:
        body["seed"] = seed
    if logprobs is not None:
        body.update(logprobs=logprobs, return_tokens_as_token_ids=True)
    started = time.perf_counter()
    await client.post("/v1/completions", body)
    return len(prompts) * n_tokens / (time.perf_counter() - started)


async def dual_tok_s(transport: Transport, prompts: list[list[int]], n_tokens: int,
                     top_k: int) -> tuple[float, float]:
    """(tokens/s, share of wall time outside awaiting the servers), all prompts in flight."""
    async def keep(_seq) -> None:
        return None

    settings = SampleSettings(top_k=top_k, max_tokens=n_tokens, alpha=None, missing="kth",
                              concurrency=len(prompts), eos_token_ids=(), max_model_len=2048)
    coordinator = Coordinator(transport, settings, keep)
    started = time.perf_counter()
    await coordinator.run(prompt_items(prompts))
    elapsed = time.perf_counter() - started
    return coordinator.tokens_generated / elapsed, 1.0 - coordinator.wait_s / elapsed


async def speed_table(theta_url: str, target_url: str, batches: list[int], n_tokens: int,
                      top_k: int, repeats: int) -> list[list]:
    text = corpus_path().read_text()
    async with VLLMClient(theta_url, name="theta", timeout_s=600) as theta, \
            VLLMClient(target_url, name="target", timeout_s=600) as target:
        await asyncio.gather(theta.describe(), target.describe())
        ids = await theta.tokenize(text[:20000])
        rows = []
        for batch in batches:
            prompts = [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(batch)]
            requests = RequestTransport(theta, target)
            await dual_tok_s(requests, prompts, 4, top_k)  # warm-up
            await native_tok_s(theta, prompts, 4)
            native = max([await native_tok_s(theta, prompts, n_tokens) for _ in range(repeats)])
            duals = [await dual_tok_s(requests, prompts, n_tokens, top_k)
                     for _ in range(repeats)]
            dual, outside = max(duals)
            rows.append([batch, n_tokens, f"{native:.0f}", f"{dual:.0f}",
                         f"{dual / native:.3f}x", f"{100 * outside:.1f}%"])
        return rows


def topk_error_table(models: dict[str, Path], ks: list[int], n_positions: int,
                     policies: tuple[str, ...] = ("kth", "uniform_rest", "floor")) -> list[list]:
    from dual_sampling.models.reference import Reference
    ref = Reference(models)
    ids = ref.tokenizer(corpus_path().read_text()[5000:60000])["input_ids"]
    seqs = [ids[i: i + 128] for i in range(0, min(len(ids), n_positions), 128)]
    rows = []
    for k, missing in ((k, m) for k in ks for m in policies):
        d_alpha, tv, outside, kl = [], [], [], []
        for seq in seqs:
            cmp = ref.alpha_full(seq, top_k=k, missing=missing)
            cand = cmp.candidates
            q_full = np.exp(cmp.log_q_full)  # (L, V)
            ids_c = np.where(cand.valid, cand.ids, 0)  # (L, M)
            q_full_c = np.where(cand.valid, np.take_along_axis(q_full, ids_c, axis=-1), 0.0)
            q_k = np.where(cand.valid, np.exp(cmp.log_q_topk), 0.0)  # (L, M)
            mass_in = q_full_c.sum(-1)  # (L,)
            d_alpha.append(np.abs(cmp.alpha_topk - cmp.alpha_full))
            tv.append(0.5 * (np.abs(q_full_c - q_k).sum(-1) + (1.0 - mass_in)))
            outside.append(1.0 - mass_in)
            p = q_full_c / mass_in[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                terms = np.where(p > 0, p * (np.log(p) - np.log(q_k)), 0.0)
            kl.append(terms.sum(-1))
        rows.append([k, missing, f"{np.mean(np.concatenate(d_alpha)):.2e}",
                     f"{np.mean(np.concatenate(tv)):.2%}",
                     f"{np.mean(np.concatenate(outside)):.2%}",
                     f"{np.mean(np.concatenate(kl)):.2e}"])
    return rows


def run_speed_table(speed_table, args: argparse.Namespace, servers: Servers | None
                    ) -> list[list]:
    """`speed_table` over the URLs and options in `args`; then stops `servers` if given."""
    try:
        return asyncio.run(speed_table(args.theta_url, args.target_url,
                                       [int(b) for b in args.batches.split(",")],
                                       args.tokens, args.top_k, args.repeats))
    finally:
        if servers is not None:
            servers.stop()


def speed_arguments(doc: str, batches: str, repeats: int) -> argparse.ArgumentParser:
    """The command-line options every dual-vs-native speed benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--theta-url")
    parser.add_argument("--target-url")
    parser.add_argument("--batches", default=batches)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--models", help="dir with theta/ and target/ (default: the tiny pair; "
                        "the real pair: .cache/real_models, python -m dual_sampling.models.real_models)")
    return parser


def bench_models(args: argparse.Namespace) -> dict[str, Path]:
    """`{"theta": dir, "target": dir}`: `--models`, else the tiny pair (built once)."""
    return ({m: Path(args.models) / m for m in ("theta", "target")} if args.models
            else ensure_tiny_models())


def main() -> None:
    parser = speed_arguments(__doc__, batches="1,32", repeats=2)
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--parts", default="speed,error", help="speed, error or both")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    models = bench_models(args)
    if "speed" in parts:
        print_speed(args, models)
    if "error" in parts:
        err = topk_error_table(models, [5, 20, 50, 100, 200], args.positions)
        print(f"\n### Top-k approximation error ({args.positions} positions of the shipped "
              f"corpus)\n")
        print(tabulate(err, headers=["k", "missing", "mean |alpha_k - alpha_full|", "TV(q_full, q_k)",
                                     "q_full mass outside candidates",
                                     "KL(q_full||q_k) on candidates"], tablefmt="github"))


def print_speed(args: argparse.Namespace, models: dict[str, Path]) -> None:
    servers = None
    if not (args.theta_url and args.target_url):
        servers = Servers(run_dir=Path(tempfile.mkdtemp(prefix="bench_sample_")), models=models)
        servers.start("theta", "target")
        args.theta_url, args.target_url = servers.url("theta"), servers.url("target")
    rows = run_speed_table(speed_table, args, servers)
    print(f"\n### Dual sampling vs native generation (top_k={args.top_k}, request transport)\n")
    print(tabulate(rows, headers=["prompts", "tokens each", "native tok/s", "dual tok/s",
                                  "dual / native", "coordinator outside server wait"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
