"""Dual sampling with each transport against native vLLM generation, at 1, 8 and 32 prompts.

    python experiments/bench_transports.py                  # starts its own CPU servers
    python experiments/bench_transports.py --theta-url U --target-url V [--batches 1,8,32]
    python experiments/bench_transports.py --one-server     # diagnostic, see below

Prints one table: native single-model generation (one /v1/completions with all prompts,
max_tokens=64, ignore_eos; experiments/bench_sample.py's native_tok_s), the same returning
each token's top-k logprobs (native+top-k: what one model alone costs with the data dual
sampling needs every step), and dual-sampling
tokens/s through the request transport (a /v1/completions request per step and server) and
the session transport (resident vLLM sessions over one WebSocket per server), with their
ratios to native and session / request. Each figure is the best of `--repeats` runs, the
three measured back to back in every repeat so they share the machine's load (the load
average is printed: on a shared box the absolute figures move a lot, the ratios less).
Targets at 32 prompts: session >= 0.5x native and >= 3x request.

`--one-server` serves both roles from the theta server (two sessions or two requests per
prompt and step, as in a real run, but one engine): a diagnostic of what each transport
costs when two engines do not share the machine's cores. Servers started here (through
start_vllm.sh) run with this package's engine tunings (dual_sampling/vllm_plugin/tuning.py);
give --theta-url/--target-url to measure servers started otherwise.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from dual_sampling.client import VLLMClient
from dual_sampling.launch import Servers
from dual_sampling.session_format import PATH as SESSION_PATH
from dual_sampling.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.transports.request import RequestTransport
from dual_sampling.transports.session import SessionTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import (PROMPT_TOKENS, dual_tok_s, native_tok_s,  # noqa: E402
                          run_speed_table, speed_arguments)


async def speed_table(theta_url: str, target_url: str, batches: list[int], n_tokens: int,
                      top_k: int, repeats: int) -> list[list]:
    async with VLLMClient(theta_url, name="theta", timeout_s=600) as theta, \
            VLLMClient(target_url, name="target", timeout_s=600) as target:
        infos = await asyncio.gather(theta.describe(), target.describe())
        for client, info in zip((theta, target), infos):
            if not info.serves(SESSION_PATH):
                raise SystemExit(f"{client.name} server at {client.url} has no session route: "
                                 f"start it with ./start_vllm.sh (the dual_sampling plugin)")
        ids = await theta.tokenize(corpus_path().read_text()[:20000])
        async with SessionTransport(theta, target, timeout_s=600) as sessions:
            requests = RequestTransport(theta, target)
            rows = []
            for batch in batches:
                prompts = [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(batch)]
                await native_tok_s(theta, prompts, 4)  # warm-up
                await dual_tok_s(requests, prompts, 4, top_k)
                await dual_tok_s(sessions, prompts, 4, top_k)
                best = {"native": 0.0, "native_topk": 0.0, "request": 0.0, "session": 0.0}
                for _ in range(repeats):
                    best["native"] = max(best["native"],
                                         await native_tok_s(theta, prompts, n_tokens))
                    best["native_topk"] = max(best["native_topk"], await native_tok_s(
                        theta, prompts, n_tokens, logprobs=top_k))
                    best["request"] = max(best["request"], (
                        await dual_tok_s(requests, prompts, n_tokens, top_k))[0])
                    best["session"] = max(best["session"], (
                        await dual_tok_s(sessions, prompts, n_tokens, top_k))[0])
                native, request, session = best["native"], best["request"], best["session"]
                rows.append([batch, f"{native:.0f}", f"{best['native_topk']:.0f}",
                             f"{request:.0f}", f"{session:.0f}", f"{request / native:.3f}x",
                             f"{session / native:.3f}x",
                             f"{session / best['native_topk']:.3f}x",
                             f"{session / request:.2f}x"])
        return rows


def main() -> None:
    parser = speed_arguments(__doc__, batches="1,8,32", repeats=3)
    parser.add_argument("--one-server", action="store_true",
                        help="serve both roles from the theta server (diagnostic)")
    args = parser.parse_args()
    servers = None
    if not args.theta_url:
        roles = ("theta",) if args.one_server else ("theta", "target")
        servers = Servers(run_dir=Path(tempfile.mkdtemp(prefix="bench_transports_")),
                          models=ensure_tiny_models())
        servers.start(*roles)
        args.theta_url = servers.url("theta")
        args.target_url = None if args.one_server else servers.url("target")
    if args.one_server:
        args.target_url = args.theta_url
    elif not args.target_url:
        parser.error("give --target-url with --theta-url (or --one-server)")
    load_before = os.getloadavg()[0]
    rows = run_speed_table(speed_table, args, servers)
    setup = "one server for both roles" if args.one_server else "theta and target servers"
    print(f"\n### Dual sampling by transport vs native generation ({setup}, top_k="
          f"{args.top_k}, {args.tokens} tokens per prompt, best of {args.repeats}; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f})\n")
    print(tabulate(rows, headers=["prompts", "native tok/s", "native+top-k tok/s",
                                  "request tok/s", "session tok/s", "request / native",
                                  "session / native", "session / native+top-k",
                                  "session / request"], tablefmt="github"))


if __name__ == "__main__":
    main()
