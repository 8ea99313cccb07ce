"""Merging the job folders of a sharded sample run (dual_sampling/merge.py), no server.

Job folders are made by sample mode's own writers (check_resume, write_shard,
ResumableJsonlWriter) from records built by sampling.sequence_record, so they have the
fields, per-token lists and nulls of a real run.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dual_sampling import merge
from dual_sampling.config import PromptDataConfig, SampleParams, SampleRunConfig
from dual_sampling.core.coordinator import TOKEN_FIELDS, PromptItem, Sequence
from dual_sampling.core.sampling import sequence_record
from dual_sampling.errors import MergeError
from dual_sampling.files import data
from dual_sampling.files.records import ResumableJsonlWriter, read_records
from dual_sampling.files.run_files import SAMPLE_KEY
from dual_sampling.maths import sample_stats
from dual_sampling.maths import groups
from dual_sampling.modes.sample import check_resume, write_shard

MERGED = ("samples.jsonl", "samples.parquet", "groups.jsonl", "summary.json")


def make_record(index: int, sample_index: int, candidates: bool = False) -> dict:
    """A record as sample mode writes it: a completion of 1 + (index + sample_index) % 3
    tokens; index 2 has a token outside the target's top-k with a null logprob, so its
    target sums and log weight are null."""
    length = 1 + (index + sample_index) % 3
    seq = Sequence(item=PromptItem(index, f"prompt {index}", [1, 2 + index]),
                   sample_index=sample_index, key=0, finish_reason="stop")
    seq.completion_ids = [10 + t for t in range(length)]
    for t in range(length):
        value = -0.25 * (t + 1) - 0.01 * index - 0.001 * sample_index
        for name in TOKEN_FIELDS:
            seq.tokens[name].append(t % 2 == 0 if name.startswith("in_topk") else
                                    0.5 if name == "alpha" else value)
        if candidates:
            seq.candidates.append({"ids_theta": [10 + t, 3], "logp_theta": [value, -4.0],
                                   "ids_target": [10 + t, 5], "logp_target": [value, None]})
    if index == 2:
        seq.tokens["logp_target"][0] = None
    return sequence_record(seq, " ".join(f"w{t}" for t in seq.completion_ids), {
        "temperature": 1.0, "theta_model": "theta-m", "target_model": "target-m",
        "theta_version": 0, "theta_path": None})


def make_run(run_dir: Path, num_prompts: int, num_shards: int, n: int = 1,
             limit: Optional[int] = None, numbered: bool = False,
             candidates: bool = False) -> list[dict]:
    """A finished sweep over shards in `run_dir` (jobs job<i>, or <i> as in Hydra's own
    sweep dir); every record written, in a job's completion order (not sorted)."""
    prompts = run_dir / "prompts.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f"prompt {i}\n" for i in range(num_prompts)))
    written = []
    for shard in range(num_shards):
        out = run_dir / (str(shard) if numbered else f"job{shard}")
        config = SampleRunConfig(
            output_dir=str(out), sample=SampleParams(n=n),
            data=PromptDataConfig(prompts=str(prompts), shard_index=shard,
                                  num_shards=num_shards, limit=limit))
        check_resume(out, config, "fused", {
            "theta": {"model": "theta", "path": "/ckpt/theta", "fingerprint": "sha256:aa"},
            "target": {"model": "target", "path": "/ckpt/target", "fingerprint": "sha256:bb"}})
        write_shard(out, config, num_prompts)
        indices = data.select(range(num_prompts), shard, num_shards, limit)
        with ResumableJsonlWriter(out / "samples.jsonl", key=SAMPLE_KEY) as writer:
            for s in reversed(range(n)):
                for index in indices:
                    writer.write(make_record(index, s, candidates))
                    written.append(make_record(index, s, candidates))
    return written


def top_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize("num_shards, n, numbered", [(2, 1, False), (3, 2, False),
                                                     (3, 3, True)])
def test_merge_is_the_sorted_union_of_the_jobs(tmp_path, num_shards, n, numbered):
    written = make_run(tmp_path, num_prompts=7, num_shards=num_shards, n=n, numbered=numbered)
    summary = merge.merge(tmp_path)
    merged = list(read_records(tmp_path / "samples.jsonl"))
    assert merged == sorted(written, key=SAMPLE_KEY)
    assert [SAMPLE_KEY(r) for r in merged] == [(i, s) for i in range(7) for s in range(n)]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary == {**sample_stats.summarize(merged, n), **summary}
    assert (summary["num_jobs"], summary["num_shards"], summary["n"]) == (num_shards, num_shards, n)
    assert summary["num_sequences"] == 7 * n and summary["theta_version"] == 0
    if n > 1:
        assert list(read_records(tmp_path / "groups.jsonl")) == groups.group_weights(merged, n)
    else:
        assert not (tmp_path / "groups.jsonl").exists()


def test_parquet_loads_with_datasets_and_round_trips(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_run(tmp_path / "run", num_prompts=5, num_shards=2, n=2, candidates=True)
    merge.merge(tmp_path / "run")
    records = list(read_records(tmp_path / "run" / "samples.jsonl"))
    assert any(r["log_w_target"] is None for r in records)  # nulls went through
    table = pq.read_table(tmp_path / "run" / "samples.parquet")
    assert table.to_pylist() == records
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "run" / "samples.parquet"),
                                   split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == len(records)
    assert loaded[3]["logp_target"] == records[3]["logp_target"]
    assert loaded[4]["candidates"] == records[4]["candidates"]
    assert loaded.features["theta_path"].dtype == "string"  # typed though null everywhere


def test_merging_again_gives_the_same_files(tmp_path):
    make_run(tmp_path, num_prompts=6, num_shards=3, n=2)
    first = merge.merge(tmp_path)
    files = top_files(tmp_path)
    assert set(MERGED) <= files.keys()
    assert merge.merge(tmp_path) == first
    assert top_files(tmp_path) == files


def test_a_killed_merge_leaves_the_previous_files(tmp_path, monkeypatch):
    make_run(tmp_path, num_prompts=4, num_shards=2)
    merge.merge(tmp_path)
    before = top_files(tmp_path)

    def killed(records, path):
        path.write_text(json.dumps(records[0])[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_write_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        merge.merge(tmp_path)
    after = top_files(tmp_path)
    assert after.pop("samples.jsonl.tmp") and after == before


def _drop_shard(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "job1")


def _drop_prompt(run_dir: Path) -> None:
    path = run_dir / "job1" / "samples.jsonl"
    kept = [r for r in read_records(path) if r["index"] != 4]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _double_sample(run_dir: Path) -> None:
    with (run_dir / "job2" / "samples.jsonl").open("a") as fh:
        fh.write(json.dumps(make_record(3, 1)) + "\n")


def _other_temperature(run_dir: Path) -> None:
    path = run_dir / "job1" / "run_params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sample.temperature": 0.5}))


def _other_target(run_dir: Path) -> None:
    path = run_dir / "job1" / "run_params.json"
    params = json.loads(path.read_text())
    params["target"] = {**params["target"], "fingerprint": "sha256:cc"}
    path.write_text(json.dumps(params))


def _other_n(run_dir: Path) -> None:
    path = run_dir / "job0" / "shard.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n": 3}))


def _copy_shard(run_dir: Path) -> None:
    shutil.copytree(run_dir / "job1", run_dir / "job3")


def _sample_beyond_n(run_dir: Path) -> None:
    with (run_dir / "job0" / "samples.jsonl").open("a") as fh:
        fh.write(json.dumps(make_record(0, 2)) + "\n")


def _no_shard_file(run_dir: Path) -> None:
    (run_dir / "job2" / "shard.json").unlink()


@pytest.mark.parametrize("spoil, named", [
    (_drop_shard, ["shards missing: 1 (job folders found: job0 (shard 0), job2 (shard 2))"]),
    (_copy_shard, ["shards in more than one job: 1 in job1, job3"]),
    (_drop_prompt, ["2 missing: (4, 0) of job1, (4, 1) of job1"]),
    (_double_sample, ["1 written more than once: (3, 1) in job0 and job2"]),
    (_sample_beyond_n, ["1 outside the shards' prompts x n=2: (0, 2) in job0"]),
    (_other_temperature, ["run_params.json `sample.temperature` differs",
                          "1.0 in job0, job2; 0.5 in job1"]),
    (_other_target, ["run_params.json `target` differs",
                     '"sha256:bb" in job0, job2; "sha256:cc" in job1']),
    (_other_n, ["shard.json `n` differs: 3 in job0; 2 in job1, job2"]),
    (_no_shard_file, ["job2/shard.json is missing"]),
])
def test_a_spoilt_run_is_refused_by_name_and_nothing_is_written(tmp_path, capsys, spoil, named):
    make_run(tmp_path, num_prompts=8, num_shards=3, n=2)
    spoil(tmp_path)
    before = top_files(tmp_path)
    with pytest.raises(MergeError) as error:
        merge.merge(tmp_path)
    for words in named:
        assert words in str(error.value)
    assert top_files(tmp_path) == before
    assert merge.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MergeError: ") and err.count("\n") == 1


def test_jobs_that_served_one_checkpoint_from_other_paths_merge(tmp_path):
    """Each job of a self-serving sweep may read the checkpoint from its own node's copy:
    models are compared by fingerprint, not path."""
    make_run(tmp_path, num_prompts=8, num_shards=3)
    path = tmp_path / "job1" / "run_params.json"
    params = json.loads(path.read_text())
    params["target"]["path"] = "/scratch/node7/target"
    path.write_text(json.dumps(params))
    merge.merge(tmp_path)


def test_a_folder_without_jobs_is_refused(tmp_path):
    make_run(tmp_path / "run", num_prompts=3, num_shards=1)
    with pytest.raises(MergeError, match="no job folder"):
        merge.merge(tmp_path / "run" / "job0")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_prompts=st.integers(1, 12), num_shards=st.integers(1, 5), n=st.integers(1, 3),
       limit=st.one_of(st.none(), st.integers(1, 4)))
def test_merged_keys_are_every_selected_prompt_times_n(num_prompts, num_shards, n, limit):
    with tempfile.TemporaryDirectory() as tmp:
        make_run(Path(tmp), num_prompts, num_shards, n, limit)
        merge.merge(Path(tmp))
        keys = [SAMPLE_KEY(r) for r in read_records(Path(tmp) / "samples.jsonl")]
    indices = sorted(i for shard in range(num_shards)
                     for i in data.select(range(num_prompts), shard, num_shards, limit))
    assert keys == [(i, s) for i in indices for s in range(n)]
    if limit is None:
        assert indices == list(range(num_prompts))
