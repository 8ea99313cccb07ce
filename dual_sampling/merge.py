"""One dataset from the job folders of a sharded sample run, no server.

    python -m dual_sampling.merge RUN_DIR
    python -m dual_sampling.merge --format messages RUN_DIR    # also messages.jsonl (SFT)

RUN_DIR is the output_dir of a sweep over shards (`-m data.num_shards=64
data.shard_index='range(0,64)' output_dir=RUN_DIR`: jobs in RUN_DIR/job0, job1, ...) or a
Hydra multirun directory (jobs in RUN_DIR/0, 1, ...); every subfolder holding samples.jsonl
is a job. The merge writes into RUN_DIR:

    samples.jsonl    every record of every job, sorted by (index, sample_index)
    samples.parquet  the same rows: datasets.load_dataset("parquet", data_files=...)
    groups.jsonl     the group weights, when n > 1 (dual_sampling/maths/groups.py)
    summary.json     the summary of all records (dual_sampling/maths/sample_stats.py), with the
                     numbers of jobs and shards

Before writing anything it checks that the jobs make one dataset: they agree on the prompts
file, its number of prompts, num_shards, n (their shard.json, written by sample mode) and
their run_params.json (the settings, transport and models that decide the tokens; models
compared by fingerprint); each shard in [0, num_shards)
is in exactly one job; each prompt of the shards has samples 0..n-1, each exactly once, and
nothing else is there. Otherwise MergeError names the jobs, shards and samples at fault, and
the command prints one line `error: ...` and exits 2. Each file is written to a temporary
sibling and renamed into place, so a killed merge leaves no half file; merging again gives
the same files (the merged files in RUN_DIR are not a job). All records are held in memory:
the summary and the group weights need them all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from dual_sampling.core.coordinator import TOKEN_FIELDS
from dual_sampling.errors import DualSamplingError, MergeError
from dual_sampling.files import data
from dual_sampling.files.records import MESSAGES_FILE, read_records, to_messages
from dual_sampling.files.run_files import (GROUPS_FILE, RUN_PARAMS_FILE, SAMPLE_KEY, SAMPLES_FILE,
                                          SHARD_FILE, SUMMARY_FILE, distribution_params,
                                          theta_summary)
from dual_sampling.maths import sample_stats
from dual_sampling.maths import groups

PARQUET_FILE = "samples.parquet"
# shard.json (modes/sample.py write_shard); shard_index and limit are each job's own
SHARD_FIELDS = ("prompts", "num_prompts", "shard_index", "num_shards", "limit", "n")
SHARED_SHARD_FIELDS = ("prompts", "num_prompts", "num_shards", "n")
SHOWN = 5  # problems named in a message; the rest are counted
FLOATS, INTS = pa.list_(pa.float64()), pa.list_(pa.int64())
# The Parquet types of the fields sample mode writes (modes/sample.py, sampling.py). Fixed
# rather than inferred, so that a field null in every record (theta_path without a
# load_theta, a log weight of -inf) or per-token lists of nulls keep their type, and the
# datasets of two runs concatenate. A field not named here is inferred from the records.
COLUMN_TYPES: dict[str, pa.DataType] = {
    **dict.fromkeys(("index", "sample_index", "num_tokens", "theta_version"), pa.int64()),
    **dict.fromkeys(("prompt", "completion", "finish_reason", "theta_model", "target_model",
                     "theta_path"), pa.string()),
    **dict.fromkeys(("prompt_token_ids", "completion_token_ids"), INTS),
    **{name: pa.list_(pa.bool_()) if name.startswith("in_topk") else FLOATS
       for name in TOKEN_FIELDS},
    **dict.fromkeys(("sum_logp_theta", "sum_logp_target", "sum_logp_q", "log_w_theta",
                     "log_w_target", "mean_alpha", "temperature"), pa.float64()),
    "candidates": pa.list_(pa.struct([("ids_theta", INTS), ("logp_theta", FLOATS),
                                      ("ids_target", INTS), ("logp_target", FLOATS)])),
}


@dataclass
class Job:
    """One job folder of the run: what its shard.json and run_params.json say, its records."""

    path: Path
    shard: dict[str, Any]
    run_params: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    def expected(self) -> set[tuple[int, int]]:
        """The (index, sample_index) keys this job's shard should hold."""
        s = self.shard
        indices = data.select(range(s["num_prompts"]), s["shard_index"], s["num_shards"],
                              s["limit"])
        return {(index, sample) for index in indices for sample in range(s["n"])}


def find_jobs(run_dir: Path) -> list[Path]:
    """The subfolders of `run_dir` holding samples.jsonl, in numeric order (job2 before
    job10); MergeError when there is none."""
    if not run_dir.is_dir():
        raise MergeError(f"{run_dir}: no such directory; give the output_dir of a sweep over "
                         f"shards or a Hydra multirun directory.")

    def number(path: Path) -> tuple[int, str]:
        digits = "".join(c for c in path.name if c.isdigit())
        return (int(digits) if digits else -1, path.name)

    jobs = sorted((p for p in run_dir.iterdir() if (p / SAMPLES_FILE).is_file()), key=number)
    if not jobs:
        raise MergeError(f"{run_dir} has no job folder (a subfolder holding {SAMPLES_FILE}): "
                         f"give the output_dir of a sweep over shards (jobs job0, job1, ...) or "
                         f"a Hydra multirun directory (jobs 0, 1, ...).")
    return jobs


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MergeError(f"{path} is missing: sample mode writes it at the start of a run (a "
                         f"job run before it did lacks {SHARD_FILE}); run that job again "
                         f"with the same output_dir: it resumes, writes the file and samples "
                         f"only what is missing.")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise MergeError(f"{path}: not JSON ({exc}); run the job again with the same "
                         f"output_dir to rewrite it.") from exc


def read_job(path: Path) -> Job:
    """A job folder's shard.json, run_params.json and records (each given a `sample_index`,
    0 for a record written before groups); MergeError naming the file on a bad one."""
    records = []
    for number, record in enumerate(read_records(path / SAMPLES_FILE), start=1):
        try:
            record.setdefault("sample_index", SAMPLE_KEY(record)[1])
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"{path / SAMPLES_FILE}:{number}: record without an integer "
                             f"`{SAMPLE_KEY}`: not written by dual_sampling's sample "
                             f"mode.") from exc
        records.append(record)
    shard = _read_json(path / SHARD_FILE)
    if absent := [name for name in SHARD_FIELDS if name not in shard]:
        raise MergeError(f"{path / SHARD_FILE} lacks {', '.join(absent)}: it was edited or "
                         f"written by another version; run the job again with the same "
                         f"output_dir to rewrite it.")
    return Job(path, shard, _read_json(path / RUN_PARAMS_FILE), records)


def _few(items: list[str], shown: int = SHOWN) -> str:
    """The first `shown` items, then how many there are in all."""
    text = ", ".join(items[:shown])
    return text if len(items) <= shown else f"{text}, ... ({len(items)} in all)"


def _disagreements(jobs: list[Job], what: str,
                   fields: Callable[[Job], dict[str, Any]]) -> list[str]:
    """One line per field whose value differs between jobs: each value and its jobs."""
    problems = []
    for key in sorted(set().union(*(fields(job) for job in jobs))):
        holders: dict[str, list[str]] = defaultdict(list)
        for job in jobs:
            holders[json.dumps(fields(job).get(key))].append(job.name)
        if len(holders) > 1:
            problems.append(f"{what} `{key}` differs: " + "; ".join(
                f"{value} in {_few(names)}" for value, names in holders.items()))
    return problems


def check_jobs(run_dir: Path, jobs: list[Job]) -> None:
    """Raise MergeError unless the jobs make one dataset (the module docstring's checks)."""
    problems = (_disagreements(jobs, SHARD_FILE,
                               lambda job: {k: job.shard.get(k) for k in SHARED_SHARD_FIELDS})
                + _disagreements(jobs, RUN_PARAMS_FILE,
                                 lambda job: distribution_params(job.run_params)))
    if problems:
        raise MergeError(f"{run_dir}: the jobs were not run with the same settings, so their "
                         f"samples are not one dataset: " + " | ".join(problems)
                         + ". Merge only the jobs of one sweep.")
    num_shards, n = jobs[0].shard["num_shards"], jobs[0].shard["n"]
    shard_jobs: dict[int, list[str]] = defaultdict(list)
    for job in jobs:
        shard_jobs[job.shard["shard_index"]].append(job.name)
    problems = []
    if missing := [str(i) for i in range(num_shards) if i not in shard_jobs]:
        problems.append(f"shards missing: {_few(missing, shown=4 * SHOWN)}")
    if doubled := [f"{i} in {', '.join(names)}" for i, names in sorted(shard_jobs.items())
                   if len(names) > 1]:
        problems.append(f"shards in more than one job: {_few(doubled)}")
    if problems:
        found = _few([f"{job.name} (shard {job.shard['shard_index']})" for job in jobs],
                     shown=4 * SHOWN)
        raise MergeError(
            f"{run_dir}: of num_shards={num_shards}, " + "; ".join(problems)
            + f" (job folders found: {found}). Run each missing shard i again with "
            f"data.shard_index=i output_dir={run_dir}/job<i>, keep one job per shard, and "
            f"merge again.")
    owner = {key: job.name for job in jobs for key in job.expected()}
    holders: dict[tuple[int, int], list[str]] = defaultdict(list)
    for job in jobs:
        for record in job.records:
            holders[SAMPLE_KEY(record)].append(job.name)
    problems = []
    if lost := sorted(owner.keys() - holders.keys()):
        problems.append(f"{len(lost)} missing: " + _few([f"{k} of {owner[k]}" for k in lost])
                        + " (a job killed or still running: run it again with the same "
                        "output_dir, it resumes)")
    if twice := sorted(k for k, names in holders.items() if len(names) > 1):
        problems.append(f"{len(twice)} written more than once: " + _few(
            [f"{k} in {' and '.join(holders[k])}" for k in twice])
            + " (remove the repeated lines or job folder)")
    if stray := sorted(holders.keys() - owner.keys()):
        problems.append(f"{len(stray)} outside the shards' prompts x n={n}: " + _few(
            [f"{k} in {', '.join(holders[k])}" for k in stray])
            + " (a job folder of another run, or samples of a run with a greater n)")
    if problems:
        raise MergeError(f"{run_dir}: samples (index, sample_index) " + "; ".join(problems)
                         + ". Nothing was written.")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary sibling)`, then rename it to `path`: a kill leaves the old file or
    none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def parquet_schema(records: list[dict[str, Any]]) -> pa.Schema:
    """Every field of the records, in first-seen order, typed by COLUMN_TYPES or inferred."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return pa.schema([(name, COLUMN_TYPES[name] if name in COLUMN_TYPES else
                       pa.array([record.get(name) for record in records]).type)
                      for name in names])


def _write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")


def merge(run_dir: Path) -> dict[str, Any]:
    """Check the jobs under `run_dir` and write the merged files; the merged summary.

    Raises MergeError (nothing written) when the jobs do not make one dataset.
    """
    run_dir = Path(run_dir)
    jobs = [read_job(path) for path in find_jobs(run_dir)]
    check_jobs(run_dir, jobs)
    records = sorted((record for job in jobs for record in job.records), key=SAMPLE_KEY)
    n, num_shards = jobs[0].shard["n"], jobs[0].shard["num_shards"]
    summary = sample_stats.summarize(records, n)
    summary.update({
        "n": n, "temperature": jobs[0].run_params.get("sample.temperature"),
        "num_jobs": len(jobs), "num_shards": num_shards, **theta_summary(records),
        "dataset": str(run_dir / SAMPLES_FILE), "parquet": str(run_dir / PARQUET_FILE),
    })
    table = pa.Table.from_pylist(records, schema=parquet_schema(records))
    write_atomically(run_dir / PARQUET_FILE, lambda tmp: pq.write_table(table, tmp))
    if n > 1:
        groups.write_groups(run_dir / GROUPS_FILE, groups.group_weights(records, n))
    write_atomically(run_dir / SAMPLES_FILE, lambda tmp: _write_jsonl(records, tmp))
    write_atomically(run_dir / SUMMARY_FILE,  # last, after the files it describes
                     lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def write_messages(run_dir: Path) -> Path:
    """RUN_DIR/messages.jsonl from RUN_DIR/samples.jsonl (a single run's output_dir, or a
    merged one): one `records.to_messages` row per sample, in (index, sample_index) order,
    which TRL's SFTTrainer reads through `datasets.load_dataset("json", ...)`."""
    if not (run_dir / SAMPLES_FILE).is_file():
        raise MergeError(f"{run_dir} holds no {SAMPLES_FILE} to turn into messages")
    records = sorted(read_records(run_dir / SAMPLES_FILE), key=SAMPLE_KEY)
    write_atomically(run_dir / MESSAGES_FILE,
                     lambda tmp: _write_jsonl([to_messages(r) for r in records], tmp))
    return run_dir / MESSAGES_FILE


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dual_sampling.merge",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="the output_dir of a sweep over shards, or a Hydra multirun "
                             "directory (with --format messages, also one run's output_dir)")
    parser.add_argument("--format", choices=("samples", "messages"), default="samples",
                        help="messages: also write messages.jsonl, chat rows for supervised "
                             "fine-tuning (TRL's SFTTrainer reads them as they are)")
    args = parser.parse_args(argv)
    single = (args.run_dir / SAMPLES_FILE).is_file() and not any(
        (p / SAMPLES_FILE).is_file() for p in args.run_dir.iterdir() if p.is_dir())
    try:
        if not (single and args.format == "messages"):
            summary = merge(args.run_dir)
            print(f"merged {summary['num_jobs']} jobs ({summary['num_shards']} shards), "
                  f"{summary['num_sequences']} samples: {summary['dataset']}, "
                  f"{summary['parquet']}")
        if args.format == "messages":
            print(f"SFT rows: {write_messages(args.run_dir)}")
    except DualSamplingError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
