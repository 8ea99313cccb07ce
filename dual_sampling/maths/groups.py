"""Groups: the n completions of one prompt, with their self-normalised importance weights.

    rows = group_weights(list(read_records(out / "samples.jsonl")), n)
    write_groups(out / "groups.jsonl", rows)

`samples.jsonl` holds one record per (index, sample_index), appended as each sample
finishes, so a killed run resumes at sample granularity and no group is half doubled or
half lost. A group's weights need all of its samples, so they are not in those records:
they are derived from the complete groups of `samples.jsonl` into `groups.jsonl`, rewritten
whole (atomically) at the end of every run, and always recomputable from `samples.jsonl`.

For a group of prompt i with log weights log_w_s = sum_t logp_model - sum_t logp_q (the
sequence-level importance log weight of sample s towards theta or target), the normalised
weights are w_s = exp(log_w_s) / sum_s' exp(log_w_s'), and the group ESS is Kish's
(sum w)^2 / sum w^2 in [1, n]: what a GRPO/RLOO user reweighting a group would use.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dual_sampling.maths import mixture

MODELS = ("theta", "target")


def complete_groups(records: list[dict[str, Any]], n: int) -> dict[int, list[dict[str, Any]]]:
    """index -> its n records in sample_index order, for each prompt with samples 0..n-1 all
    present (a record without `sample_index` is sample 0)."""
    by_index: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        by_index[record["index"]][record.get("sample_index", 0)] = record
    return {index: [samples[s] for s in range(n)] for index, samples in sorted(by_index.items())
            if all(s in samples for s in range(n))}


def log_weights(group_records: list[list[dict[str, Any]]], model: str) -> np.ndarray:
    """(G, n) sequence log weights towards `model`; a null (a -inf term) is -inf."""
    key = f"log_w_{model}"
    return np.array([[-np.inf if r[key] is None else r[key] for r in group]
                     for group in group_records], dtype=np.float64)


def group_weights(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """One row per complete group: index, n, and per model its log weights, normalised
    weights (sum 1), ESS and ESS / n."""
    groups = complete_groups(records, n)
    if not groups:
        return []
    rows: list[dict[str, Any]] = [{"index": index, "n": n} for index in groups]
    for model in MODELS:
        log_w = log_weights(list(groups.values()), model)  # (G, n)
        weights = mixture.normalised_weights(log_w)  # (G, n)
        ess = mixture.effective_sample_size(log_w)  # (G,)
        for row, lw, w, e in zip(rows, log_w, weights, ess):
            row[f"log_w_{model}"] = [float(v) if np.isfinite(v) else None for v in lw]
            row[f"weight_{model}"] = w.tolist()
            row[f"ess_{model}"] = float(e)
            row[f"ess_{model}_fraction"] = float(e) / n
    return rows


def summarize_groups(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Run-level group figures: how many groups are complete, their mean ESS fraction
    (null without a complete group)."""
    summary: dict[str, Any] = {"groups_complete": len(rows)}
    for model in MODELS:
        key = f"ess_{model}_fraction"
        summary[f"mean_group_{key}"] = float(np.mean([r[key] for r in rows])) if rows else None
    return summary


def write_groups(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace `path` with these rows as JSONL, atomically (a kill leaves the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
    os.replace(tmp, path)
