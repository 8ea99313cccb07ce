"""The speculative verify step's own cost, in process (no server): its parts, the draft's
probabilities reused against recomputed from theta's logits, and the verify step of an
earlier commit side by side.

    python experiments/bench_verify.py [--vocab 49152] [--batches 1,8,32] [--k 4]
                                       [--baseline fd53341]

Rows are the real pair's shape (49,152 ids): theta's logits random normal * 3, the target's
0.6 * theta + normal * 2 (alpha* near 0.5, acceptance about 0.5 at T = 1). Each figure is the
best of `--repeats` calls of one verify step over `batch` requests with K drafts each (K + 1
verified rows a request), at T = 1 and T = 0.7; ms per step, on this machine's CPU.

- parts: solve / accept / draw / record, from the step's own timers (verify.Step.seconds);
- probs given / recomputed: the draft's probabilities handed over by vLLM (a gather per
  draft) against theta's tempered softmax recomputed at the draft rows;
- `--baseline REV`: that commit's verify (fused/speculate.py there, loaded from git), which
  built q* densely at every verified row; "new / old" is this tree's time over it.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from dual_sampling.vllm_plugin.fused import verify

REPO = Path(__file__).resolve().parents[1]


def step_inputs(batch: int, k: int, vocab: int, temperature: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = batch * (k + 1)
    theta = torch.tensor(3.0 * rng.standard_normal((rows, vocab)), dtype=torch.float32)
    target = 0.6 * theta + torch.tensor(2.0 * rng.standard_normal((rows, vocab)),
                                        dtype=torch.float32)
    draft_rows = [i * (k + 1) + j for i in range(batch) for j in range(k)]
    probs = torch.softmax(theta[draft_rows] / temperature, dim=-1)
    ids = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    return theta, target, ids, probs


def requests(module, batch: int, k: int, temperature: float) -> list:
    return [module.Request(f"r{i}", 100 + i, None, temperature, 3, k) for i in range(batch)]


def best_ms(call, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - t0
        if elapsed < best:  # the parts shown are the best call's
            best, out = elapsed, result
    return 1e3 * best, out


def load_baseline(rev: str) -> types.ModuleType:
    """`rev`'s verify step (fused/speculate.py there), its imports pointed at this tree."""
    source = subprocess.run(["git", "show", f"{rev}:dual_sampling/vllm_plugin/fused/speculate.py"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    source = re.sub(r"^from dual_sampling\.vllm_plugin import patches\n", "", source, flags=re.M)
    source = re.sub(r"^from dual_sampling\.vllm_plugin\.fused import kernels, state\n",
                    "from dual_sampling.maths import kernels\n", source, flags=re.M)
    source = re.sub(r"^from dual_sampling\.vllm_plugin\.fused\.setup import EXTRA_KEY\n",
                    "EXTRA_KEY = 'dual_sampling_fused'\n", source, flags=re.M)
    module = types.ModuleType(f"speculate_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:speculate.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a git revision to compare against")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    old = load_baseline(args.baseline) if args.baseline else None
    rows = []
    for temperature in (1.0, 0.7):
        for batch in (int(b) for b in args.batches.split(",")):
            theta, target, ids, probs = step_inputs(batch, args.k, args.vocab, temperature)
            reqs = requests(verify, batch, args.k, temperature)
            verify.verify(theta, target, reqs, ids, probs)  # warm-up (compiled kernels)
            given, (step, _) = best_ms(lambda: verify.verify(theta, target, reqs, ids, probs),
                                       args.repeats)
            again, _ = best_ms(lambda: verify.verify(theta, target, reqs, ids, None),
                               args.repeats)
            row = [temperature, batch, f"{given:.1f}",
                   *(f"{1e3 * step.seconds[p]:.1f}" for p in ("solve", "accept", "draw",
                                                              "record")),
                   f"{again:.1f}", f"{again / given:.2f}"]
            if old is not None:
                old_reqs = requests(old, batch, args.k, temperature)
                old.verify(theta, target, old_reqs, ids, probs)
                before, _ = best_ms(lambda: old.verify(theta, target, old_reqs, ids, probs),
                                    args.repeats)
                row += [f"{before:.1f}", f"{given / before:.2f}"]
            rows.append(row)
    headers = ["T", "requests", "verify ms (probs given)", "solve", "accept", "draw", "record",
               "probs recomputed ms", "recomputed / given"]
    if old is not None:
        headers += [f"{args.baseline} ms", "new / old"]
    print(f"\nverify step, K = {args.k}, {args.vocab} ids, best of {args.repeats}, "
          f"{torch.get_num_threads()} torch threads\n")
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
