"""Dual sampling with each transport against native vLLM generation, at 1, 8 and 32 prompts.

    python experiments/bench_transports.py                  # starts its own CPU servers
    python experiments/bench_transports.py --theta-url U --target-url V --fused-url F
    python experiments/bench_transports.py --one-server     # diagnostic, see below
    python experiments/bench_transports.py --models .cache/real_models   # the real pair

Prints one table: native single-model generation (one /v1/completions with all prompts,
max_tokens=64, ignore_eos; experiments/bench_sample.py's native_tok_s), the same returning
each token's top-k logprobs (native+top-k: what one model alone costs with the data dual
sampling needs every step), and dual-sampling tokens/s through the fused transport (both
models in one engine, start_vllm.sh --fused: every prompt in flight as one request, the
exact full-vocabulary q* sampled inside vLLM), the request transport (a /v1/completions
request per step and server) and the session transport (resident vLLM sessions over one
WebSocket per server), with their ratios to native. Each figure is the best of `--repeats`
runs, those of one phase measured back to back in every repeat so they share the machine's
load (the load average is printed: on a shared box the absolute figures move a lot, the
ratios less). `solve share` is the fraction of the fused run's wall time the engine spent
solving alpha* (the worker's counters, /v1/dual_sampling/fused/counters); the KV-cache bytes
per token of each setup follow the table. `fused fixed` fixes alpha at 0.5 (no solve). Phase 2
also times the target alone; `fused / two-pass bound` and `fused / target` carry the fused
speed into phase 2 by its ratio to phase 1's native theta (the two-pass bound is
1 / (1 / theta + 1 / target), both models' decode one after the other). Targets at 32
prompts: fused >= 0.6x native and >= 3x session; session >= 0.5x native and >= 3x request.

Servers started here (through start_vllm.sh, with this package's engine tunings) come up
two at a time, to leave the shared machine's other users room: phase 1 measures native and
fused (theta and fused servers), phase 2 native, request and session (theta and target
servers); fused / session is the ratio of the two phases' ratios to their own native.
`--one-server` serves both roles of phase 2 from the theta server (two sessions or two
requests per prompt and step, but one engine): a diagnostic of what each transport costs
when two engines do not share the machine's cores.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate
from transformers import AutoConfig

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.transports.request import RequestTransport
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.models.tiny_models import corpus_path
from dual_sampling.serving.launch import Servers
from dual_sampling.vllm_plugin.fused.setup import kv_bytes_per_token
from dual_sampling.wire.session_format import PATH as SESSION_PATH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import (PROMPT_TOKENS, bench_models, dual_tok_s,  # noqa: E402
                          fused_run, native_tok_s, speed_arguments)


async def fused_tok_s(fused: VLLMClient, prompts: list[list[int]], n_tokens: int,
                      alpha: float | None = None) -> tuple[float, float]:
    """(tokens/s, share of the wall time the engine spent solving alpha*), all in flight;
    `alpha` None solves alpha* per token, a number fixes it."""
    tok_s, elapsed, delta = await fused_run(fused, prompts, n_tokens, alpha)
    return tok_s, delta["solve_s"] / elapsed


async def bench_prompts(client: VLLMClient, batches: list[int]) -> dict[int, list[list[int]]]:
    ids = await client.tokenize(corpus_path().read_text()[:20000])
    return {batch: [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(batch)] for batch in batches}


async def fused_phase(theta_url: str, fused_url: str, batches: list[int], n_tokens: int,
                      repeats: int) -> dict[int, dict[str, float]]:
    """Per batch: best native, fused (alpha*) and fused (alpha fixed at 0.5) tok/s, and the
    alpha* run's solve share."""
    async with VLLMClient(theta_url, name="theta", timeout_s=600) as theta, \
            VLLMClient(fused_url, name="fused", timeout_s=600) as fused:
        infos = await asyncio.gather(theta.describe(), fused.describe())
        if not infos[1].fused:
            raise SystemExit(f"{fused_url} is not a fused server: start it with "
                             f"./start_vllm.sh --fused --theta A --target B")
        results = {}
        for batch, prompts in (await bench_prompts(theta, batches)).items():
            await native_tok_s(theta, prompts, 4)  # warm-up
            await fused_tok_s(fused, prompts, 4)
            best = {"native": 0.0, "fused": 0.0, "fixed": 0.0, "solve_share": 0.0}
            for _ in range(repeats):
                best["native"] = max(best["native"], await native_tok_s(theta, prompts, n_tokens))
                speed, share = await fused_tok_s(fused, prompts, n_tokens)
                if speed > best["fused"]:
                    best["fused"], best["solve_share"] = speed, share
                best["fixed"] = max(best["fixed"],
                                    (await fused_tok_s(fused, prompts, n_tokens, 0.5))[0])
            results[batch] = best
        return results


async def two_server_phase(theta_url: str, target_url: str, batches: list[int], n_tokens: int,
                           top_k: int, repeats: int) -> dict[int, dict[str, float]]:
    """Per batch: best native (theta and target), native+top-k, request and session tok/s."""
    async with VLLMClient(theta_url, name="theta", timeout_s=600) as theta, \
            VLLMClient(target_url, name="target", timeout_s=600) as target:
        infos = await asyncio.gather(theta.describe(), target.describe())
        for client, info in zip((theta, target), infos):
            if not info.serves(SESSION_PATH):
                raise SystemExit(f"{client.name} server at {client.url} has no session route: "
                                 f"start it with ./start_vllm.sh (the dual_sampling plugin)")
        results = {}
        async with SessionTransport(theta, target, timeout_s=600) as sessions:
            requests = RequestTransport(theta, target)
            for batch, prompts in (await bench_prompts(theta, batches)).items():
                await native_tok_s(theta, prompts, 4)  # warm-up
                await dual_tok_s(requests, prompts, 4, top_k)
                await dual_tok_s(sessions, prompts, 4, top_k)
                best = {"native": 0.0, "target": 0.0, "native_topk": 0.0, "request": 0.0,
                        "session": 0.0}
                for _ in range(repeats):
                    best["native"] = max(best["native"],
                                         await native_tok_s(theta, prompts, n_tokens))
                    best["target"] = max(best["target"],
                                         await native_tok_s(target, prompts, n_tokens))
                    best["native_topk"] = max(best["native_topk"], await native_tok_s(
                        theta, prompts, n_tokens, logprobs=top_k))
                    best["request"] = max(best["request"], (
                        await dual_tok_s(requests, prompts, n_tokens, top_k))[0])
                    best["session"] = max(best["session"], (
                        await dual_tok_s(sessions, prompts, n_tokens, top_k))[0])
                results[batch] = best
        return results


def table(batches: list[int], fused: dict, two: dict) -> list[list]:
    rows = []
    for batch in batches:
        f, t = fused[batch], two[batch]
        fused_ratio, session_ratio = f["fused"] / f["native"], t["session"] / t["native"]
        # two-pass bound: what theta then target, one after the other, would take
        bound = 1 / (1 / t["native"] + 1 / t["target"])
        rows.append([batch, f"{f['native']:.0f}", f"{f['fused']:.0f}", f"{f['fixed']:.0f}",
                     f"{fused_ratio:.3f}x", f"{f['fixed'] / f['native']:.3f}x",
                     f"{100 * f['solve_share']:.1f}%", f"{t['native']:.0f}", f"{t['target']:.0f}",
                     f"{fused_ratio * t['native'] / bound:.2f}",
                     f"{fused_ratio * t['native'] / t['target']:.2f}x",
                     f"{t['native_topk']:.0f}", f"{t['request']:.0f}", f"{t['session']:.0f}",
                     f"{t['request'] / t['native']:.3f}x", f"{session_ratio:.3f}x",
                     f"{t['session'] / t['request']:.2f}x", f"{fused_ratio / session_ratio:.2f}x"])
    return rows


HEADERS = ["prompts", "native tok/s (1)", "fused tok/s", "fused fixed tok/s", "fused / native",
           "fixed / native", "solve share", "native tok/s (2)", "target tok/s (2)",
           "fused / two-pass bound", "fused / target", "native+top-k tok/s", "request tok/s",
           "session tok/s",
           "request / native", "session / native", "session / request", "fused / session"]


def main() -> None:
    parser = speed_arguments(__doc__, batches="1,8,32", repeats=3)
    parser.add_argument("--fused-url")
    parser.add_argument("--one-server", action="store_true",
                        help="serve both roles of phase 2 from the theta server (diagnostic)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    models = bench_models(args)
    load_before = os.getloadavg()[0]
    servers = None
    if not args.theta_url:
        servers = Servers(run_dir=Path(tempfile.mkdtemp(prefix="bench_transports_")),
                          models=models)
    try:
        if servers is not None:
            servers.start("theta")
            servers.start_fused()
            args.theta_url, args.fused_url = servers.url("theta"), servers.url("fused")
        elif not args.fused_url:
            parser.error("give --fused-url with --theta-url")
        fused = asyncio.run(fused_phase(args.theta_url, args.fused_url, batches, args.tokens,
                                        args.repeats))
        if servers is not None:
            servers.stop()
            servers.start(*(("theta",) if args.one_server else ("theta", "target")))
            args.target_url = servers.url("theta" if args.one_server else "target")
        elif args.one_server:
            args.target_url = args.theta_url
        elif not args.target_url:
            parser.error("give --target-url with --theta-url (or --one-server)")
        two = asyncio.run(two_server_phase(args.theta_url, args.target_url, batches,
                                           args.tokens, args.top_k, args.repeats))
    finally:
        if servers is not None:
            servers.stop()
    setup = "phase 2 on one server for both roles" if args.one_server else "theta and target"
    print(f"\n### Dual sampling by transport vs native generation ({setup}, top_k="
          f"{args.top_k} for request/session, {args.tokens} tokens per prompt, best of "
          f"{args.repeats}; {os.cpu_count()} CPUs, load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f})\n")
    print(tabulate(table(batches, fused, two), headers=HEADERS, tablefmt="github"))
    configs = {m: AutoConfig.from_pretrained(models[m]) for m in ("theta", "target")}
    native_kv = kv_bytes_per_token(configs["theta"], 4)
    fused_kv = native_kv + kv_bytes_per_token(configs["target"], 4)
    print(f"\nKV cache per token (float32): native theta {native_kv} B, fused {fused_kv} B "
          f"({fused_kv / native_kv:.1f}x); two servers hold {fused_kv} B in two engines.")


if __name__ == "__main__":
    main()
