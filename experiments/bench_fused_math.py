"""The fused sampler's math alone (maths/kernels.py), per engine step, over vocabulary and
batch size.

    python experiments/bench_fused_math.py [--vocab 2048 32000 151936] [--batch 1 32 256]
                                           [--repeats 3] [--threads 1] [--compare OLD.py]

Times one step's work of the fused logits processor on both models' float32 logits, as the
engine hands them over: `Rows.of` (the normalisers) + `solve` (from `first_guess`, as the
server does; with alpha fixed: `solve` with `fixed`) + the mixture's diagnostics + `sample`,
best of `--repeats`, next to one `torch.log_softmax` of the same (B, V) logits (vLLM's
sampler does a softmax of that size every step). Logits are LM-like: N(0, 1) times a per-row
scale in [2, 4] (a long tail within 40 nats of the top; real LMs look like that), the target a
perturbation of theta's. `--compare` times another version of the module side by side (e.g.
`git show REV:dual_sampling/maths/kernels.py > old.py`, or
`REV:dual_sampling/vllm_plugin/fused_math.py` for a revision before the fused/ package; a
version from before the compiled kernels is timed with the two log-softmaxes its composite
model computed), and prints the largest |alpha difference| between the two (an old module
is warm-started 0.05 from alpha*, as it was at every token). `max |alpha err|` is against the
numpy reference (`mixture.solve_alpha` in float64 at tol 1e-12). The kernels compile before
timing.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from types import ModuleType

import numpy as np
import torch
from tabulate import tabulate

from dual_sampling.maths import mixture
from dual_sampling.maths import kernels


def pair(batch: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-like float32 logits (B, V) for theta and target."""
    generator = torch.Generator().manual_seed(seed)
    scale = 2 + 2 * torch.rand(batch, 1, generator=generator)
    theta = torch.randn(batch, vocab, generator=generator) * scale
    target = theta + torch.randn(batch, vocab, generator=generator) * scale * 0.5
    return theta, target


def step(module: ModuleType, theta: torch.Tensor, target: torch.Tensor, start: np.ndarray,
         u: torch.Tensor, fixed: bool = False) -> torch.Tensor:
    """One engine step's math on the logits; alpha (B,). `start` is the fixed alpha, or an
    old module's warm start (this one starts from its first_guess, as the server does)."""
    if hasattr(module, "solve"):
        rows = module.Rows.of(theta, target)
        first = start if fixed or not hasattr(module, "first_guess") else None
        solution = module.solve(rows, first, np.full(len(start), fixed))
        mix = solution.mixture()
        module.sample(rows, solution, mix.log_z, u, torch.ones_like(u))
        return solution.alpha
    # before the compiled kernels: the composite model's two log-softmaxes, then the math
    workspace = WORKSPACES.setdefault(module.__name__, module.Workspace())
    rows = module.Rows.of(theta.log_softmax(-1), target.log_softmax(-1), workspace)
    alpha = torch.as_tensor(start) if fixed else module.solve_alpha(rows, start)[0]
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
    spec = importlib.util.spec_from_file_location("kernels_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 32000, 151936])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compare", help="another maths/kernels.py to time side by side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    other = load(args.compare) if args.compare else None
    table = []
    for vocab in args.vocab:
        for batch in args.batch:
            theta, target = pair(batch, vocab)
            exact = mixture.solve_alpha(theta.double().numpy(), target.double().numpy(),
                                        tol=1e-12)
            start = np.clip(exact + np.random.default_rng(0).normal(0, 0.05, batch), 0, 1)
            u = torch.rand(batch, dtype=torch.float64)
            timed = {}
            for name, module in (("new", kernels), ("old", other)):
                if module is None:
                    continue
                for fixed in (False, True):
                    step(module, theta, target, start, u, fixed)  # compiles, warms buffers
                    timed[name, fixed] = best_ms(
                        lambda: step(module, theta, target, start, u, fixed), args.repeats)
            rows = kernels.Rows.of(theta, target)
            solution = kernels.solve(rows)
            error = np.abs(solution.alpha.numpy() - exact).max()
            softmax_ms = best_ms(lambda: torch.log_softmax(theta, -1), args.repeats)
            row = [vocab, batch, f"{softmax_ms:.1f}", f"{timed['new', False]:.1f}",
                   f"{timed['new', True]:.1f}", solution.evaluations,
                   f"{timed['new', False] / softmax_ms:.1f}x",
                   f"{timed['new', True] / softmax_ms:.1f}x", f"{error:.1e}"]
            if other is not None:
                alpha_old = step(other, theta, target, start, u)
                row += [f"{timed['old', False]:.1f}", f"{timed['old', True]:.1f}",
                        f"{timed['old', False] / timed['new', False]:.1f}x",
                        f"{timed['old', True] / timed['new', True]:.1f}x",
                        f"{(step(kernels, theta, target, start, u) - alpha_old).abs().max().item():.1e}"]
            table.append(row)
    headers = ["V", "B", "log_softmax ms", "alpha* step ms", "fixed step ms", "evaluations (alpha*)",
               "alpha* step / log_softmax", "fixed step / log_softmax", "max |alpha err|"]
    if other is not None:
        headers += ["old alpha* ms", "old fixed ms", "speed-up alpha*", "speed-up fixed",
                    "max |alpha diff|"]
    print(f"torch threads: {torch.get_num_threads()}")
    print(tabulate(table, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
