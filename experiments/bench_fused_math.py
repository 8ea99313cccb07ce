"""The fused sampler's math alone (fused_math), per engine step, over vocabulary and batch size.

    python experiments/bench_fused_math.py [--vocab 2048 32000 151936] [--batch 1 32 256]
                                           [--repeats 3] [--compare OLD_FUSED_MATH.py]

Times one step's work of the fused logits processor on float32 log-softmax rows, as the
engine hands them over: `Rows.of` + `solve_alpha` (warm-started, as at every token after the
first) + `Mixture.at` + the token's inverse CDF, best of `--repeats`, next to a plain
`torch.log_softmax` of the same (B, V) logits (what each model's own log-softmax costs; vLLM's
sampler does a softmax of that size every step). Rows are LM-like: logits N(0, 1) times a
per-row scale in [2, 4] (a long tail within 40 nats of the top, so nothing can be pruned;
real LMs look like that), the target a perturbation of theta's. `--compare` times another
version of the module (e.g. `git show REV:dual_sampling/vllm_plugin/fused_math.py > old.py`)
side by side, and prints the largest |alpha difference| between the two.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from types import ModuleType

import numpy as np
import torch
from tabulate import tabulate

from dual_sampling.vllm_plugin import fused_math


def pair(batch: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-like float32 log-softmax rows (B, V) for theta and target."""
    generator = torch.Generator().manual_seed(seed)
    scale = 2 + 2 * torch.rand(batch, 1, generator=generator)
    theta = torch.randn(batch, vocab, generator=generator) * scale
    target = theta + torch.randn(batch, vocab, generator=generator) * scale * 0.5
    return theta.log_softmax(-1), target.log_softmax(-1)


def step(module: ModuleType, logp_theta: torch.Tensor, logp_target: torch.Tensor,
         start: np.ndarray, u: torch.Tensor) -> torch.Tensor:
    """One engine step's math; with this module's Workspace, as the engine's processor runs."""
    if hasattr(module, "Workspace"):
        workspace = WORKSPACES.setdefault(module.__name__, module.Workspace())
        rows = module.Rows.of(logp_theta, logp_target, workspace)
    else:
        rows = module.Rows.of(logp_theta, logp_target)
    alpha, _ = module.solve_alpha(rows, start)
    mix = module.Mixture.at(rows, alpha)
    module.inverse_cdf(mix.weights, u)
    return alpha


WORKSPACES: dict = {}


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fused_math_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 32000, 151936])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", help="another fused_math.py to time side by side")
    args = parser.parse_args()
    other = load(args.compare) if args.compare else None
    table = []
    for vocab in args.vocab:
        for batch in args.batch:
            logp_theta, logp_target = pair(batch, vocab)
            exact, _ = fused_math.solve_alpha(fused_math.Rows.of(logp_theta, logp_target))
            start = np.clip(exact.numpy() + np.random.default_rng(0).normal(0, 0.05, batch), 0, 1)
            u = torch.rand(batch, dtype=torch.float64)
            softmax_ms = best_ms(lambda: torch.log_softmax(logp_theta, -1), args.repeats)
            new_ms = best_ms(lambda: step(fused_math, logp_theta, logp_target, start, u),
                             args.repeats)
            row = [vocab, batch, f"{softmax_ms:.1f}", f"{new_ms:.1f}",
                   f"{new_ms / softmax_ms:.1f}x"]
            if other is not None:
                old_ms = best_ms(lambda: step(other, logp_theta, logp_target, start, u),
                                 min(args.repeats, 2))
                alpha_new = step(fused_math, logp_theta, logp_target, start, u)
                alpha_old = step(other, logp_theta, logp_target, start, u)
                row += [f"{old_ms:.1f}", f"{old_ms / new_ms:.1f}x",
                        f"{(alpha_new - alpha_old).abs().max().item():.1e}"]
            table.append(row)
    headers = ["V", "B", "log_softmax ms", "fused step ms", "step / log_softmax"]
    if other is not None:
        headers += ["compared ms", "speed-up", "max |alpha diff|"]
    print(f"torch threads: {torch.get_num_threads()}")
    print(tabulate(table, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
