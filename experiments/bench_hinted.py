"""A teacher that sees the answer, on the real pair: how often the completions are right.

    python experiments/bench_hinted.py [--samples 4] [--max-tokens 48] [--temperature 1.0]

A small problem set whose answers are known (sums and capitals, the answer as the
`solution` field). Two real servers (theta and target, start_vllm.sh --cpu), the exact
session path, side by side in one run, each on the same problems and seeds:

- theta alone (alpha fixed at 0);
- q* with a plain teacher (both models read the problem);
- q* with a hinted teacher (the target reads "{problem}\\n\\n## Hint\\n{solution}", theta the
  problem alone: per-model prompts);
- the same with the ess_balance rule, and with the entropy rule clamped to [0.5, 1] (the
  `optimal_sampling` package's defaults);
- the hinted target alone (alpha fixed at 1), for reference.

Printed per setup: the share of completions that contain the right answer, mean alpha,
mean KL(q||theta) and KL(q||target) per token, the mean log importance weight of a
completion against each model (log w = sum log p_model - sum log q), and the ESS fraction
against theta (what an off-policy learner keeps).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from tabulate import tabulate

from dual_sampling.api import SyncDualSampler
from dual_sampling.maths.mixture import ess_fraction
from dual_sampling.models.real_models import ensure_real_models
from dual_sampling.serving.launch import Servers

PAIRS = [(17, 25), (38, 44), (12, 19), (56, 27), (23, 48), (61, 15), (34, 29), (47, 36)]
CAPITALS = [("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Chile", "Santiago")]
PROBLEMS = ([{"problem": f"What is {a} + {b}? Answer with the number.", "solution": str(a + b)}
             for a, b in PAIRS]
            + [{"problem": f"What is the capital of {country}?", "solution": city}
               for country, city in CAPITALS])
HINT = "{problem}\n\n## Hint\nThe answer is {solution}."


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


def setups() -> dict[str, tuple[list[dict], dict]]:
    plain = [chat(p["problem"]) for p in PROBLEMS]
    hinted = [{**chat(p["problem"]), "target": chat(HINT.format(**p))} for p in PROBLEMS]
    return {"theta alone (alpha = 0)": (plain, {"alpha": 0.0}),
            "q*, plain teacher": (plain, {}),
            "q*, hinted teacher": (hinted, {}),
            "q*, hinted teacher, ess_balance": (hinted, {"alpha_method": "ess_balance"}),
            "q*, hinted teacher, entropy on [0.5, 1]": (
                hinted, {"alpha_method": "entropy", "alpha_min": 0.5}),
            "hinted target alone (alpha = 1)": (hinted, {"alpha": 1.0})}


def row(name: str, records: list[dict]) -> list:
    right = [PROBLEMS[r["index"]]["solution"].lower() in r["completion"].lower()
             for r in records]
    tokens = {k: np.concatenate([r[k] for r in records]) for k in
              ("alpha", "kl_q_theta", "kl_q_target")}
    log_w = {m: np.array([r[f"log_w_{m}"] for r in records], dtype=float)
             for m in ("theta", "target")}
    return [name, f"{np.mean(right):.2f}", f"{tokens['alpha'].mean():.3f}",
            f"{tokens['kl_q_theta'].mean():.3f}", f"{tokens['kl_q_target'].mean():.3f}",
            f"{log_w['theta'].mean():.2f}", f"{log_w['target'].mean():.2f}",
            f"{ess_fraction(log_w['theta']):.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    models = ensure_real_models()
    with tempfile.TemporaryDirectory() as run_dir:
        pair = Servers(run_dir=Path(run_dir), models=dict(models),
                       extra=("--max-model-len", "1024"))
        try:
            pair.start("theta", "target")
            rows = []
            with SyncDualSampler(pair.url("theta"), pair.url("target"),
                                 transport="session") as sampler:
                for name, (prompts, options) in setups().items():
                    records = sampler.sample(prompts, n=args.samples,
                                             max_tokens=args.max_tokens,
                                             temperature=args.temperature, seed=11, **options)
                    rows.append(row(name, records))
        finally:
            pair.stop()
    print(f"\n{len(PROBLEMS)} problems x {args.samples} samples, {args.max_tokens} tokens, "
          f"T = {args.temperature}, exact session path on the real pair, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(tabulate(rows, headers=["setup", "right answer", "mean alpha", "KL(q||theta)",
                                  "KL(q||target)", "mean log w_theta", "mean log w_target",
                                  "ESS fraction (theta)"], tablefmt="github"))


if __name__ == "__main__":
    main()
