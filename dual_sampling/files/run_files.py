"""A sample run's files (samples.jsonl, summary.json, groups.jsonl, run_params.json,
shard.json), the key of a record, what identifies the models of a run, the policy versions
behind its records and its summary as a table: what sample mode writes and merge and score
read."""
from __future__ import annotations

from typing import Any

from tabulate import tabulate

from dual_sampling.files.records import FieldsKey

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
GROUPS_FILE = "groups.jsonl"
RUN_PARAMS_FILE = "run_params.json"
SHARD_FILE = "shard.json"
# files written before groups have no sample_index: each of their records is sample 0
SAMPLE_KEY = FieldsKey(("index", "sample_index"), defaults=(("sample_index", 0),))


def distribution_params(run_params: dict[str, Any]) -> dict[str, Any]:
    """run_params.json with each model as what identifies it (its fingerprint, else its
    path): jobs that served one checkpoint from different paths compare equal (merge.py)."""
    def identity(model: dict[str, Any]) -> Any:
        return model.get("fingerprint") or model.get("path")
    out = dict(run_params)
    if "target" in out:
        out["target"] = identity(out["target"])
    if "theta" in out:
        out["theta"] = [identity(t) for t in out["theta"]]
    return out


def theta_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The policy versions behind a file's records: one value, or the sorted list when a
    resumed run sampled part of the file after a load_theta."""
    out: dict[str, Any] = {}
    for name in ("theta_version", "theta_path"):
        values = sorted({r.get(name) for r in records}, key=lambda v: (v is None, str(v)))
        out[name] = values[0] if len(values) == 1 else values
    return out


def format_summary(summary: dict[str, Any]) -> str:
    rows = [[key, f"{value:.4g}" if isinstance(value, float) else value]
            for key, value in summary.items()]
    return tabulate(rows, headers=["summary", "value"], tablefmt="github")
