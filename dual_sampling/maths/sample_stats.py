"""What a sample dataset shows, computed from its records: the run summary (the numbers of
summary.json and the report's table) and the report's curves. numpy, no I/O.

Records are those of `samples.jsonl` (modes/sample.py); per-token lists hold null where a
value was not finite, read here as NaN (a log weight: -inf).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dual_sampling.maths import mixture
from dual_sampling.maths import groups


def column(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """A per-token field of every record, concatenated: (total tokens,), NaN for null."""
    return np.array([np.nan if v is None else v for r in records for v in r[name]],
                    dtype=np.float64)


def sequence_log_weights(records: list[dict[str, Any]], model: str) -> np.ndarray:
    """Sequence log importance weights `log_w_<model>` (N,), -inf for null."""
    return np.array([-np.inf if r[f"log_w_{model}"] is None else r[f"log_w_{model}"]
                     for r in records], dtype=np.float64)


def summarize(records: list[dict[str, Any]], n: int = 1) -> dict[str, Any]:
    """Run summary over every record of a dataset: means per token, ESS over all sequences
    together and, for groups of n > 1, over each complete group (dual_sampling/maths/groups.py)."""
    if not records:
        return {"num_sequences": 0}
    count = len(records)
    ess = {model: float(mixture.effective_sample_size(sequence_log_weights(records, model)))
           for model in groups.MODELS}
    summary = {
        "num_sequences": count,
        "num_prompts": len({r["index"] for r in records}),
        "num_tokens": int(sum(r["num_tokens"] for r in records)),
        "mean_alpha": float(np.nanmean(column(records, "alpha"))),
        "mean_kl_q_theta": float(np.nanmean(column(records, "kl_q_theta"))),
        "mean_kl_q_target": float(np.nanmean(column(records, "kl_q_target"))),
        "mean_coverage_theta": float(np.nanmean(column(records, "coverage_theta"))),
        "mean_coverage_target": float(np.nanmean(column(records, "coverage_target"))),
        "ess_theta": ess["theta"], "ess_theta_fraction": ess["theta"] / count,
        "ess_target": ess["target"], "ess_target_fraction": ess["target"] / count,
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in records)
                           for k in sorted({r["finish_reason"] for r in records})},
    }
    if n > 1:
        summary.update(groups.summarize_groups(groups.group_weights(records, n)))
    return summary


def by_position(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """Mean of a per-token field at each completion position over the sequences that reach
    it: (L,) for the longest completion L; NaN where every value there is null."""
    length = max(len(r[name]) for r in records)
    values = np.full((len(records), length), np.nan)  # (N, L)
    for row, record in enumerate(records):
        values[row, :len(record[name])] = [np.nan if v is None else v for v in record[name]]
    counts = np.sum(~np.isnan(values), axis=0)  # (L,)
    return np.where(counts > 0, np.nansum(values, axis=0) / np.maximum(counts, 1), np.nan)


def coverage_by_k(records: list[dict[str, Any]], model: str) -> Optional[np.ndarray]:
    """Mean probability mass of a server's top-k' for k' = 1..k: (k,), from the candidates
    the records hold (`sample.record_candidates=true`); None without them."""
    lists = [c[f"logp_{model}"] for r in records for c in r.get("candidates", [])]
    if not lists:
        return None
    logp = np.array([[-np.inf if v is None else v for v in row] for row in lists])  # (T, k)
    probs = -np.sort(-np.exp(logp), axis=1)  # (T, k) descending
    return np.cumsum(probs, axis=1).mean(axis=0)  # (k,)
