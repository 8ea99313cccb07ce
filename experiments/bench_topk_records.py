"""The two-server transports' per-token record math at a real vocabulary size.

    python experiments/bench_topk_records.py [--vocab 2048 151936] [--batch 1 32 256] [--k 20]

Times, per coordinator step, the numpy work dual_sampling/core/coordinator.py does on the two
servers' top-k lists (B, k): merge_topk (with `missing=kth` and `uniform_rest`, the one that
reads the vocabulary size), solve_alpha, log_mixture, temper, inverse_cdf,
token_diagnostics and both top-k coverages, best of 5, on ids drawn from the whole
vocabulary. The lists are (B, k) whatever V is, so the cost should not grow with V.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from tabulate import tabulate

from dual_sampling.maths import mixture


def topk_lists(rng: np.random.Generator, batch: int, vocab: int, k: int):
    """Both servers' top-k lists (ids (B, k), logprobs (B, k) descending), sharing half of
    their ids as related models do, drawn from the whole vocabulary."""
    ids = np.stack([rng.choice(vocab, size=k + k // 2, replace=False) for _ in range(batch)])

    def logp():
        return np.sort(-rng.exponential(3.0, size=(batch, k)), axis=-1)[:, ::-1] - 0.5

    return ids[:, :k], logp(), ids[:, k // 2:], logp()


def step(lists, missing: str, vocab: int, uniforms: np.ndarray) -> None:
    ids_theta, logp_theta, ids_target, logp_target = lists
    cand = mixture.merge_topk(ids_theta, logp_theta, ids_target, logp_target,
                              missing=missing, vocab_size=vocab)
    alpha = mixture.solve_alpha(cand.logp_theta, cand.logp_target)
    log_q = mixture.temper(mixture.log_mixture(cand.logp_theta, cand.logp_target, alpha), 1.0)
    mixture.inverse_cdf(log_q, uniforms)
    mixture.token_diagnostics(cand.logp_theta, cand.logp_target, log_q)
    mixture.topk_coverage(logp_theta), mixture.topk_coverage(logp_target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 151936])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = []
    for batch in args.batch:
        for vocab in args.vocab:
            lists = topk_lists(rng, batch, vocab, args.k)
            uniforms = rng.uniform(size=batch)
            row = [f"{vocab:,}", batch]
            for missing in ("kth", "uniform_rest"):
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    step(lists, missing, vocab, uniforms)
                    times.append(time.perf_counter() - t0)
                row += [f"{1e3 * min(times):.2f}", f"{1e6 * min(times) / batch:.0f}"]
            table.append(row)
    print(tabulate(table, headers=["V", "B", "ms/step (kth)", "us/token (kth)",
                                   "ms/step (uniform_rest)", "us/token (uniform_rest)"],
                   tablefmt="github"))
    print(f"\nk = {args.k}, best of 5")


if __name__ == "__main__":
    main()
