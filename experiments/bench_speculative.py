"""The fused engine's speculative mode against the non-speculative one, the target alone and
theta alone, at 1 / 8 / 32 prompts and K = 2 / 4 / 6 draft tokens a step.

    python experiments/bench_speculative.py                          # the tiny pair
    python experiments/bench_speculative.py --models .cache/real_models   # the real pair
    python experiments/bench_speculative.py --ks 0,2,4,6,4:8         # K:B = off above B

Servers (start_vllm.sh, this package's engine tunings): theta alone and the target alone stay
up the whole run; one fused server at a time, for each K (0 = the non-speculative engine).
In every phase and repeat the target alone, theta alone and the fused server are timed back
to back on the same prompts (the machine's load moves the absolute figures; the ratios to
the target measured beside them move less). Each figure is the best of `--repeats`.

- fused: q* through the fused route as sample mode drives it (FusedCoordinator, all
  prompts in flight, `--tokens` per prompt, ignore_eos), tokens/s;
- native target / theta: one /v1/completions request with all prompts (vLLM's own loop);
- spec / K=0: (fused_K / target) / (fused_0 / target), each measured in its own phase;
- acceptance: draft tokens accepted / proposed (the worker's counters); tokens / verify:
  tokens a request gets per verify step (1 + accepted drafts; K + 1 at most).
A second table splits each speculative step (issue 35): the verify step's own parts (solve,
accept, draw, record: ms a step from the worker's counters) and their share of the wall
time, beside the cost model of docs/speculative.md (c from the native servers, E measured,
its prediction at v = 1 and the v the measured speed-up implies).
Targets (issue 27): at 1 prompt, speculative >= 1.3x non-speculative fused and >= the
target alone.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from dual_sampling.clients.client import VLLMClient
from dual_sampling.serving.launch import Servers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import bench_models, fused_run, native_tok_s, speed_arguments  # noqa: E402
from bench_transports import bench_prompts  # noqa: E402


async def speculative_run(fused: VLLMClient, prompts: list[list[int]], n_tokens: int
                          ) -> dict[str, float]:
    """tokens/s of the fused route, with the worker's speculation counters over the run."""
    tok_s, elapsed, delta = await fused_run(fused, prompts, n_tokens)
    steps = delta.get("verify_steps", 0)
    parts = {part: 1e3 * delta[f"verify_{part}_s"] / steps if steps else None
             for part in PARTS}
    return {"tok_s": tok_s,
            "acceptance": delta["accepted"] / delta["proposed"] if delta["proposed"] else None,
            "per_verify": delta["emitted"] / delta["rows"] if delta["proposed"] else None,
            "step_ms": 1e3 * elapsed / steps if steps else None,
            "math_share": delta["apply_s"] / elapsed if steps else None, **parts}


async def phase(urls: dict[str, str], batches: list[int], n_tokens: int, repeats: int
                ) -> dict[int, dict[str, float]]:
    async with VLLMClient(urls["theta"], name="theta", timeout_s=900) as theta, \
            VLLMClient(urls["target"], name="target", timeout_s=900) as target, \
            VLLMClient(urls["fused"], name="fused", timeout_s=900) as fused:
        results = {}
        for batch, prompts in (await bench_prompts(theta, batches)).items():
            await speculative_run(fused, prompts, 4)  # warm-up
            best: dict[str, float] = {"target": 0.0, "theta": 0.0, "fused": 0.0}
            for _ in range(repeats):
                best["target"] = max(best["target"], await native_tok_s(target, prompts,
                                                                        n_tokens))
                best["theta"] = max(best["theta"], await native_tok_s(theta, prompts, n_tokens))
                run = await speculative_run(fused, prompts, n_tokens)
                if run["tok_s"] > best["fused"]:
                    best.update({key: value for key, value in run.items() if key != "tok_s"},
                                fused=run["tok_s"])
            results[batch] = best
        return results


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, dict[int, dict]], batches: list[int]) -> list[list]:
    rows = []
    base = results.get("0", {})
    for batch in batches:
        for k, by_batch in results.items():
            r = by_batch[batch]
            vs_target = r["fused"] / r["target"]
            vs_plain = (vs_target / (base[batch]["fused"] / base[batch]["target"])
                        if k != "0" and base else None)
            rows.append([batch, k, f"{r['fused']:.1f}", fmt(vs_plain), f"{vs_target:.2f}",
                         f"{r['fused'] / r['theta']:.2f}", f"{r['target']:.1f}",
                         f"{r['theta']:.1f}", fmt(r.get("acceptance")),
                         fmt(r.get("per_verify"))])
    return rows


def parts_table(results: dict[str, dict[int, dict]], batches: list[int]) -> list[list]:
    """Per speculative K: the verify step's own parts (ms a step, the worker's counters),
    their share of the wall time, and the cost model (docs/speculative.md) beside the
    measured speed-up: c from the two native servers, E measured, the speed-up it predicts
    at v = 1 (a GPU's memory-bound verify pass) and the v the measurement implies."""
    rows = []
    base = results.get("0", {})
    for batch in batches:
        for k, by_batch in results.items():
            r = by_batch[batch]
            if k == "0" or not r.get("step_ms") or not base:
                continue
            drafts = int(k.split(":")[0])
            c = r["target"] / r["theta"]  # a theta step's cost over a target step's
            e = r["per_verify"]
            measured = (r["fused"] / r["target"]) / (base[batch]["fused"] / base[batch]["target"])
            predicted = e * (1 + c) / (drafts * c + (1 + c))
            implied_v = (e * (1 + c) / measured - drafts * c) / (1 + c)
            rows.append([batch, k, f"{e:.2f}", f"{c:.2f}", f"{predicted:.2f}",
                         f"{measured:.2f}", f"{implied_v:.2f}", f"{r['step_ms']:.1f}",
                         *(fmt(r[part], ".2f") for part in PARTS), fmt(r["math_share"])])
    return rows


PARTS = ("solve", "accept", "draw", "record")
PARTS_HEADERS = ["prompts", "K", "E (tokens / verify)", "c", "model at v = 1",
                 "measured spec / K=0", "implied v", "ms / verify step",
                 *(f"{part} ms" for part in PARTS), "verify math share"]
HEADERS = ["prompts", "K", "fused tok/s", "spec / K=0", "fused / target", "fused / theta",
           "target tok/s", "theta tok/s", "acceptance", "tokens / verify"]


def main() -> None:
    parser = speed_arguments(__doc__, batches="1,8,32", repeats=2)
    parser.add_argument("--ks", default="0,2,4,6",
                        help="comma-separated K (0: non-speculative) or K:B values")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ks = args.ks.split(",")
    models = bench_models(args)
    load_before = os.getloadavg()[0]
    run_dir = Path(tempfile.mkdtemp(prefix="bench_speculative_"))
    plain = Servers(run_dir=run_dir / "plain", models=models)
    results: dict[str, dict[int, dict]] = {}
    try:
        plain.start("theta", "target")
        for k in ks:
            fused = Servers(run_dir=run_dir / f"fused_{k.replace(':', '_')}", models=models,
                            extra=("--max-model-len", "2048"))
            try:
                fused.start_fused(speculate=k)
                urls = {"theta": plain.url("theta"), "target": plain.url("target"),
                        "fused": fused.url("fused")}
                results[k] = asyncio.run(phase(urls, batches, args.tokens, args.repeats))
            finally:
                fused.stop()
            print(f"K={k} done", file=sys.stderr, flush=True)
    finally:
        plain.stop()
    name = Path(args.models).name if args.models else "tiny_models"
    print(f"\n### Speculative fused sampling ({name}, {args.tokens} tokens per prompt, alpha*, "
          f"T=1, best of {args.repeats}; {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print(tabulate(table(results, batches), headers=HEADERS, tablefmt="github"))
    print("\nThe verify step's parts and the cost model (docs/speculative.md):\n")
    print(tabulate(parts_table(results, batches), headers=PARTS_HEADERS, tablefmt="github"))


if __name__ == "__main__":
    main()
