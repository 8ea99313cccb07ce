"""The exact two-engine transport against the fused engine and the top-k session transport.

    python experiments/bench_exact.py                        # the real pair and a 151,936-id pair
    python experiments/bench_exact.py --pairs real --batch 1 8 32 --tokens 64 --repeats 2

For each pair, three CPU servers through start_vllm.sh (theta, target, and the fused server of
the same two models) stay up together; per number of prompts, each repeat runs back to back,
on the same load: the fused engine (q* inside one engine), the session transport over the
merged top-20 (`sample.top_k=20`) and the exact session transport (`top_k` unset: each server
sends its whole logits row every step, the coordinator samples q* with the fused kernels).
Every completion is `--tokens` long (EOS ignored), alpha* solved per token. Printed per row:
tokens/s of each (best of `--repeats`), exact / top-k and exact / fused, the exact path's
bytes on the wire per token (both servers' frames, both ways), the coordinator's CPU time per
token (its whole process: socket reads, frame decoding, the kernels) and, of that, the
kernels' share (solve alpha*, q*'s sums, the draw).

Pairs: `real` is .cache/real_models (SmolLM2-135M-Instruct and its 12-layer theta, 49,152
ids; built by `python -m dual_sampling.models.real_models` if missing); `wide` is shaped_models'
tiny-64 / tiny-128 pair with the tokenizer widened to 151,936 ids (Qwen's size).
Targets at 32 prompts on this CPU: exact >= 0.8x top-k and >= 0.7x fused on the real pair,
>= 0.5x fused at 151,936 ids.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.coordinator import Coordinator, SampleSettings
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.models.tiny_models import corpus_path
from dual_sampling.serving.launch import Servers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import PROMPT_TOKENS, fused_run, prompt_items  # noqa: E402

WIDE_VOCAB = 151936


def pair_models(name: str, models_dir: Path) -> dict[str, Path]:
    if name == "real":
        from dual_sampling.models.real_models import ensure_real_models
        return ensure_real_models()
    from dual_sampling.models.shaped_models import make_pair
    out = models_dir / f"wide{WIDE_VOCAB}"
    if (out / "target" / "config.json").exists():
        return {"theta": out / "theta", "target": out / "target"}
    return make_pair(out, "tiny-64", "tiny-128", vocab=WIDE_VOCAB)


async def _keep(_seq) -> None:
    return None


async def session_run(theta: VLLMClient, target: VLLMClient, prompts: list[list[int]],
                      n_tokens: int, top_k: int | None) -> dict[str, float]:
    settings = SampleSettings(top_k=top_k, max_tokens=n_tokens, alpha=None, missing="kth",
                              concurrency=len(prompts), eos_token_ids=(), max_model_len=2048)
    async with SessionTransport(theta, target, timeout_s=600) as transport:
        coordinator = Coordinator(transport, settings, _keep)
        started, cpu = time.perf_counter(), time.process_time()
        await coordinator.run(prompt_items(prompts))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        sides = (transport.theta, transport.target)
        wire = sum(side.bytes_sent + side.bytes_received for side in sides)
    tokens = coordinator.tokens_generated
    return {"tok_s": tokens / elapsed, "bytes": wire / tokens, "cpu_ms": 1e3 * cpu / tokens,
            "math": coordinator.math_s / cpu if cpu > 0 else 0.0}


async def measure(urls: dict[str, str], batches: list[int], n_tokens: int, repeats: int
                  ) -> list[list]:
    async with VLLMClient(urls["theta"], name="theta", timeout_s=600) as theta, \
            VLLMClient(urls["target"], name="target", timeout_s=600) as target, \
            VLLMClient(urls["fused"], name="fused", timeout_s=600) as fused:
        await asyncio.gather(theta.describe(), target.describe(), fused.describe())
        ids = await theta.tokenize(corpus_path().read_text()[:20000])
        rows = []
        for batch in batches:
            prompts = [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(batch)]
            await fused_run(fused, prompts, 4)  # warm-ups: compiled kernels, caches
            await session_run(theta, target, prompts, 4, 20)
            await session_run(theta, target, prompts, 4, None)
            best = {"fused": 0.0, "topk": 0.0, "exact": {"tok_s": 0.0}}
            for _ in range(repeats):
                best["fused"] = max(best["fused"], (await fused_run(fused, prompts, n_tokens))[0])
                topk = await session_run(theta, target, prompts, n_tokens, 20)
                best["topk"] = max(best["topk"], topk["tok_s"])
                exact = await session_run(theta, target, prompts, n_tokens, None)
                if exact["tok_s"] > best["exact"]["tok_s"]:
                    best["exact"] = exact
            exact = best["exact"]
            rows.append([batch, f"{best['fused']:.0f}", f"{best['topk']:.0f}",
                         f"{exact['tok_s']:.0f}", f"{exact['tok_s'] / best['topk']:.2f}x",
                         f"{exact['tok_s'] / best['fused']:.2f}x",
                         f"{exact['bytes'] / 1e3:.0f} kB", f"{exact['cpu_ms']:.2f} ms",
                         f"{100 * exact['math']:.0f}%"])
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["real", "wide"], choices=["real", "wide"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models-dir", type=Path, default=Path(".cache/bench_exact"))
    args = parser.parse_args()
    headers = ["prompts", "fused tok/s", "top-20 session tok/s", "exact session tok/s",
               "exact / top-k", "exact / fused", "wire / token", "coordinator CPU / token",
               "kernels share"]
    for name in args.pairs:
        models = pair_models(name, args.models_dir)
        with tempfile.TemporaryDirectory() as run_dir:
            pair = Servers(run_dir=Path(run_dir) / "pair", models=dict(models),
                           extra=("--max-model-len", "2048"))
            one = Servers(run_dir=Path(run_dir) / "fused", models=dict(models),
                          extra=("--max-model-len", "2048"))
            try:
                pair.start("theta", "target")
                one.start_fused()
                urls = {"theta": pair.url("theta"), "target": pair.url("target"),
                        "fused": one.url("fused")}
                rows = asyncio.run(measure(urls, args.batch, args.tokens, args.repeats))
            finally:
                one.stop()
                pair.stop()
        load = os.getloadavg()[0]
        print(f"\n{name} pair ({models['theta']}, {models['target']}), {args.tokens} tokens "
              f"per prompt, best of {args.repeats}, load average {load:.1f}, servers "
              f"{'eager' if os.environ.get('DUAL_SAMPLING_EAGER') == '1' else 'compiled'}")
        print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
