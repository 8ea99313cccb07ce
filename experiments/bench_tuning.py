"""The shm spin settings of dual_sampling/vllm_plugin/tuning.py, per kind of start_vllm.sh launch.

    python experiments/bench_tuning.py [--kinds pair,model,fused] [--latency-requests 200]
    python experiments/bench_tuning.py --defaults-only    # start_vllm.sh's defaults: no request over 1 s?

For each kind of launch (`pair`: --theta/--target, two servers sharing the cores; `model`: one
--model server; `fused`: one --fused server) it starts the servers once per setting, one after
the other (never two kinds at once: they would share the cores), DUAL_SAMPLING_INPUT_GAP_S at
start_vllm.sh's default in all:

- `stock`: vLLM as shipped: 1 s spin, parks until a notification or the 5 s re-check
  (DUAL_SAMPLING_SHM_SPIN_S empty, DUAL_SAMPLING_SHM_MAX_PARK_S=0);
- `old cap` (pair): 1 ms spin, parks unbounded (the cap that stalled, for comparison);
- `1 ms spin`: 1 ms spin, every park bounded (tuning.cap_spin);
- `stock spin`: vLLM's 1 s spin, every park bounded;
- `50 ms spin` (one-server kinds): a 50 ms spin, every park bounded.

It measures single-prompt generation requests (64 tokens, logprobs=20) sent back to back
(`--latency-requests` for the kind's start_vllm.sh default, 60 otherwise, 30 for the old cap,
whose stalls take 5-25 s each) and 60 with random 0-5 ms gaps, and the kind's own
throughput: dual sampling through the session and request transports (pair), native
generation of 32 prompts (model), the fused transport (fused). Prints one table, ratios to
the kind's stock setting; `*` marks start_vllm.sh's default.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.transports.request import RequestTransport
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.models.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.serving.launch import ENGINE_STEPS, Servers, server_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import PROMPT_TOKENS, dual_tok_s, native_tok_s  # noqa: E402
from bench_transports import fused_tok_s  # noqa: E402

SETTINGS = {"stock": {"DUAL_SAMPLING_SHM_SPIN_S": "", "DUAL_SAMPLING_SHM_MAX_PARK_S": "0"},
            "old cap": {"DUAL_SAMPLING_SHM_SPIN_S": "0.001", "DUAL_SAMPLING_SHM_MAX_PARK_S": "0"},
            "1 ms spin": {"DUAL_SAMPLING_SHM_SPIN_S": "0.001"},
            "stock spin": {"DUAL_SAMPLING_SHM_SPIN_S": ""},
            "50 ms spin": {"DUAL_SAMPLING_SHM_SPIN_S": "0.05"}}
KINDS = {  # kind: (its settings, start_vllm.sh's default for it)
    "pair": (("stock", "old cap", "1 ms spin"), "1 ms spin"),
    "model": (("stock", "1 ms spin", "stock spin", "50 ms spin"), "stock spin"),
    "fused": (("stock", "1 ms spin", "stock spin", "50 ms spin"), "stock spin")}
OLD_CAP_REQUESTS = 30
OTHER_REQUESTS = 60
GAP_REQUESTS = 60
MAX_GAP_S = 0.005
BATCH, TOKENS, TOP_K = 32, 64, 20


async def latencies(client: VLLMClient, model: str, back_to_back: int) -> list[float]:
    """Seconds per single-prompt request: `back_to_back` with no pause, then GAP_REQUESTS
    with random 0-5 ms gaps (around the end of a 1 ms spin, where readers park)."""
    body = {"model": model, "prompt": list(range(5, 37)), "max_tokens": 64,
            "ignore_eos": True, "logprobs": 20}
    await client.request("POST", "/v1/completions", body)  # warm
    gaps = [0.0] * back_to_back + [random.Random(0).uniform(0, MAX_GAP_S)
                                   for _ in range(GAP_REQUESTS)]
    times = []
    for gap in gaps:
        started = time.perf_counter()
        await client.request("POST", "/v1/completions", body)
        times.append(time.perf_counter() - started)
        await asyncio.sleep(gap)
    return times


async def prompts_of(client: VLLMClient) -> list[list[int]]:
    ids = await client.tokenize(corpus_path().read_text()[:20000])
    return [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(BATCH)]


async def measure(kind: str, servers: Servers, back_to_back: int) -> dict[str, float]:
    """The kind's throughput figures (tok/s) and its single-request latencies."""
    role = {"pair": "theta", "model": "model", "fused": "fused"}[kind]
    async with VLLMClient(servers.url(role), name=role, timeout_s=600) as client:
        prompts = await prompts_of(client)
        if kind == "pair":
            async with VLLMClient(servers.url("target"), name="target", timeout_s=600) as target:
                await dual_tok_s(RequestTransport(client, target), prompts, 4, TOP_K)  # warm
                request = (await dual_tok_s(RequestTransport(client, target), prompts, TOKENS,
                                            TOP_K))[0]
                async with SessionTransport(client, target, timeout_s=600) as sessions:
                    before = server_metrics(client.url, ENGINE_STEPS)[0]
                    session = (await dual_tok_s(sessions, prompts, TOKENS, TOP_K))[0]
                    steps = (server_metrics(client.url, ENGINE_STEPS)[0] - before) / TOKENS
            speed = {"session tok/s": session, "request tok/s": request,
                     "engine steps per token": steps}
        elif kind == "model":
            await native_tok_s(client, prompts, 4)
            speed = {"native tok/s": await native_tok_s(client, prompts, TOKENS)}
        else:
            await fused_tok_s(client, prompts, 4)
            speed = {"fused tok/s": (await fused_tok_s(client, prompts, TOKENS))[0]}
        times = await latencies(client, role, back_to_back)
    return {**speed, "back to back": times[:back_to_back], "random gaps": times[back_to_back:]}


def start(kind: str, servers: Servers) -> None:
    if kind == "pair":
        servers.start("theta", "target")
    elif kind == "model":
        servers.start("model")
    else:
        servers.start_fused()


def row(kind: str, name: str, got: dict, stock: dict) -> list:
    speeds = [key for key in got if key.endswith("tok/s")]
    b2b, gaps = got["back to back"], got["random gaps"]
    cells = [f"{key.removesuffix(' tok/s')} {got[key]:.0f} ({got[key] / stock[key]:.2f}x)"
             for key in speeds]
    if "engine steps per token" in got:
        cells.append(f"{got['engine steps per token']:.2f} steps/token")
    return [kind, name, "; ".join(cells), len(b2b), f"{statistics.median(b2b):.3f}",
            f"{max(b2b):.3f}", sum(t > 1.0 for t in b2b), f"{statistics.median(gaps):.3f}",
            f"{max(gaps):.3f}", sum(t > 1.0 for t in b2b + gaps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="pair,model,fused")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--defaults-only", action="store_true",
                        help="only each kind's start_vllm.sh default (the no-stall check)")
    args = parser.parse_args()
    models = ensure_tiny_models()
    models["model"] = models["theta"]
    load_before = os.getloadavg()[0]
    rows = []
    for kind in args.kinds.split(","):
        settings, default = KINDS[kind]
        settings = (default,) if args.defaults_only else settings
        runs = {}
        for name in settings:
            servers = Servers(Path(tempfile.mkdtemp(prefix=f"bench_tuning_{kind}_")), models,
                              env=SETTINGS[name])
            back_to_back = {"old cap": OLD_CAP_REQUESTS, default: args.latency_requests
                            }.get(name, OTHER_REQUESTS)
            try:
                start(kind, servers)
                runs[name] = asyncio.run(measure(kind, servers, back_to_back))
            finally:
                servers.stop()
            base = runs.get("stock", runs[name])
            print(f"{kind}, {name}: {row(kind, name, runs[name], base)}", flush=True)
        rows += [row(kind, name + (" *" if name == default else ""), got, runs.get("stock", got))
                 for name, got in runs.items()]
    print(f"\n### Shm spin settings by kind of launch ({BATCH} prompts x {TOKENS} tokens for "
          f"throughput; single requests of 64 tokens; {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print(tabulate(rows, headers=["launch", "spin", "throughput (vs stock)",
                                  "back-to-back requests", "median s", "max s",
                                  "over 1 s", "0-5 ms gaps: median s", "max s",
                                  "all over 1 s"], tablefmt="github"))


if __name__ == "__main__":
    main()
