"""sample mode end to end against two real vLLM CPU servers (the session `servers` pair).

Runs go through the real entry point (`python -m dual_sampling`, Hydra, W&B offline) as a
subprocess, so a SIGKILL is a real kill and the resume guarantees are tested as users meet
them.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dual_sampling import merge
from dual_sampling.files.records import read_records
from dual_sampling.maths import mixture
from helpers import (PROMPTS, check_dataset, run_killing_a_replica, run_sample, sample_cmd,
                     wait_for_records, write_prompts)

pytestmark = pytest.mark.server

@pytest.fixture(scope="module")
def first_run(servers, tmp_path_factory):
    """One run with candidates recorded, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("sample")
    prompts = write_prompts(tmp / "prompts.jsonl", PROMPTS[:5])
    with prompts.open("a") as fh:  # a chat record, rendered with the model's chat template
        fh.write(json.dumps({"messages": [{"role": "user", "content": "Name a module."}]}) + "\n")
    out = tmp / "out"
    done = run_sample(servers, prompts, out, "sample.record_candidates=true", "sample.top_k=20")
    return out, prompts, done


def test_dataset_is_complete_valid_and_loadable(first_run):
    out, _, done = first_run
    records = check_dataset(out, 6)
    import datasets
    loaded = datasets.load_dataset("json", data_files=str(out / "samples.jsonl"), split="train")
    assert len(loaded) == 6 and "completion" in loaded.column_names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_sequences"] == 6
    assert 0 < summary["ess_theta_fraction"] <= 1 and 0 < summary["ess_target_fraction"] <= 1
    assert "mean_alpha" in done.stdout  # the printed summary table
    # the policy behind every record (load_theta may have swapped it before: a version >= 0)
    assert {(r["theta_version"], r["theta_path"]) for r in records} == {
        (summary["theta_version"], summary["theta_path"])}
    assert summary["theta_version"] >= 0 and Path(summary["theta_path"]).name == "theta"
    assert all(isinstance(r["completion"], str) for r in records)
    chat = next(r for r in records if r["index"] == 5)
    assert chat["prompt_token_ids"][0] == 0 and "Name a module." in chat["prompt"]


def test_logprobs_match_transformers_and_alpha_matches_topk_reference(first_run, tiny_models):
    from dual_sampling.models.reference import Reference
    ref = Reference(tiny_models)
    out, _, _ = first_run
    checked = 0
    for record in list(read_records(out / "samples.jsonl"))[:3]:
        ids = record["prompt_token_ids"] + record["completion_token_ids"]
        full = {m: ref.full_logprobs(m, ids) for m in ("theta", "target")}  # (L, V)
        start = len(record["prompt_token_ids"]) - 1
        for t, cand in enumerate(record["candidates"]):
            pos = start + t
            for model in ("theta", "target"):
                got = np.array(cand[f"logp_{model}"], dtype=float)
                want = full[model][pos, cand[f"ids_{model}"]]
                np.testing.assert_allclose(got, want, atol=1e-3)
            merged = mixture.merge_topk(
                np.array([cand["ids_theta"]]), np.array([cand["logp_theta"]], dtype=float),
                np.array([cand["ids_target"]]), np.array([cand["logp_target"]], dtype=float),
                missing="kth")
            alpha = mixture.solve_alpha(merged.logp_theta, merged.logp_target)[0]
            assert abs(alpha - record["alpha"][t]) < 1e-6
            checked += 1
    assert checked >= 10


def test_wandb_offline_run_holds_the_metrics(first_run):
    out, _, _ = first_run
    files = list(out.rglob("run-*.wandb"))
    assert files, f"no offline W&B run under {out}"
    blob = b"".join(f.read_bytes() for f in files)
    for key in (b"step/alpha_mean", b"step/kl_q_theta", b"step/kl_q_target",
                b"step/coverage_theta", b"step/tokens_per_s", b"ess_theta_fraction",
                b"mean_alpha", b"samples", b"top_k"):
        assert key in blob, key


def test_same_seed_same_tokens_and_fixed_alpha(servers, first_run, tmp_path):
    out, prompts, _ = first_run
    again = tmp_path / "again"
    run_sample(servers, prompts, again, "sample.record_candidates=true", "sample.top_k=20")
    first = {r["index"]: r["completion_token_ids"] for r in read_records(out / "samples.jsonl")}
    second = {r["index"]: r["completion_token_ids"] for r in read_records(again / "samples.jsonl")}
    assert first == second
    theta_only = tmp_path / "theta_only"
    run_sample(servers, prompts, theta_only, "sample.alpha=0", "data.limit=2")
    for r in read_records(theta_only / "samples.jsonl"):  # the exact path (top_k unset)
        assert set(r["alpha"]) == {0.0}
        # KL(q||theta) = 0 up to the fused kernels' float32 block sums (~1e-7 relative, as
        # tests/test_fused.py's alpha 0/1 test allows)
        assert r["kl_q_theta"] == pytest.approx([0.0] * len(r["kl_q_theta"]), abs=1e-6)


def test_multirun_sweep_over_top_k(servers, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "sweep"
    done = subprocess.run(sample_cmd(servers, prompts, out, "sample.max_tokens=4",
                                     "sample.record_candidates=true", "sample.top_k=5,50",
                                     multirun=True), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for job, k in ((0, 5), (1, 50)):
        for record in check_dataset(out / f"job{job}", 2):
            assert {len(c["ids_theta"]) for c in record["candidates"]} == {k}
        assert (out / f"job{job}" / "summary.json").exists()


def test_sigkill_then_resume_gives_each_prompt_exactly_once(servers, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    cmd = sample_cmd(servers, prompts, out, "sample.concurrency=2", "sample.max_tokens=16")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    wait_for_records(proc, samples, 3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = samples.read_bytes().count(b"\n")
    assert 3 <= partial < len(PROMPTS)
    with samples.open("ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"index": 999, "prompt": "half a li')
    run_sample(servers, prompts, out, "sample.concurrency=2", "sample.max_tokens=16")
    check_dataset(out, len(PROMPTS))


def test_bad_input_fails_before_any_request(servers, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = run_sample(servers, empty, tmp_path / "o1", check=False)
    assert done.returncode == 2 and "holds no prompts" in done.stderr and str(empty) in done.stderr
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    done = run_sample(servers, prompts, tmp_path / "o2", "sample.top_k=300", check=False)
    assert done.returncode == 2 and "top_k=300" in done.stderr and "--max-logprobs" in done.stderr
    done = run_sample(servers, prompts, tmp_path / "o3", "sample.top_k=0", check=False)
    assert done.returncode == 2 and "sample.top_k" in done.stderr
    assert not (tmp_path / "o3" / "samples.jsonl").exists()


def test_server_that_stays_down_gives_a_clear_error(servers, tmp_path):
    from dual_sampling.serving.launch import free_port
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    down = f"http://127.0.0.1:{free_port()}"
    done = run_sample(servers, prompts, tmp_path / "o", f"target.url={down}",
                      "target.max_retries=1", check=False)
    assert done.returncode == 2
    assert f"target server at {down}" in done.stderr and "failed after 2 attempt" in done.stderr


def test_mismatched_tokenizers_are_refused(servers, tmp_path):
    """A third real server whose tokenizer lacks some merges: same vocab, other ids."""
    from dual_sampling.serving.launch import Servers
    other = tmp_path / "other"
    shutil.copytree(servers.models["theta"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][: len(tok["model"]["merges"]) // 2]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    third = Servers(run_dir=tmp_path / "vllm", models={"model": other})
    third.start("model")
    try:
        prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
        done = run_sample(servers, prompts, tmp_path / "o", f"target.url={third.url('model')}",
                          check=False)
    finally:
        third.stop()
    assert done.returncode == 2
    assert "different tokenizers" in done.stderr and "ids for" in done.stderr


def test_server_killed_mid_run_then_restarted_loses_nothing(servers, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    cmd = sample_cmd(servers, prompts, out, "sample.concurrency=2", "sample.max_tokens=16",
                     "target.max_retries=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = out / "samples.jsonl"
    wait_for_records(proc, samples, 2)
    try:
        servers.kill("target")
        _, stderr = proc.communicate(timeout=120)
    finally:
        servers.start("target")
    assert proc.returncode == 2 and "target server" in stderr
    run_sample(servers, prompts, out, "sample.concurrency=2", "sample.max_tokens=16")
    check_dataset(out, len(PROMPTS))


def test_sharded_submitit_local_run_unions_to_the_unsharded_dataset(servers, first_run, tmp_path):
    out, prompts, _ = first_run
    sharded = tmp_path / "sharded"
    done = subprocess.run(sample_cmd(servers, prompts, sharded, "hydra/launcher=local",
                                     "sample.top_k=20",  # first_run's path: the merged top-20
                                     "data.num_shards=2", "data.shard_index=0,1",
                                     f"hydra.sweep.dir={tmp_path / 'sweep'}", multirun=True),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [list(read_records(sharded / f"job{j}" / "samples.jsonl")) for j in (0, 1)]
    assert {r["index"] for r in parts[0]}.isdisjoint(r["index"] for r in parts[1])
    union = {r["index"]: r["completion_token_ids"] for part in parts for r in part}
    whole = {r["index"]: r["completion_token_ids"] for r in read_records(out / "samples.jsonl")}
    assert union == whole
    assert merge.merge(sharded)["num_jobs"] == 2  # the jobs' shard.json cover every prompt
    assert [(r["index"], r["completion_token_ids"])
            for r in read_records(sharded / "samples.jsonl")] == sorted(whole.items())


def test_replica_killed_mid_run_its_prompts_finish_elsewhere(servers, tmp_path):
    """theta has two replicas; one is SIGKILLed mid-run; the run still completes."""
    from dual_sampling.serving.launch import Servers
    replica = Servers(run_dir=tmp_path / "vllm", models={"model": servers.models["theta"]})
    replica.start("model")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    cmd = sample_cmd(servers, prompts, out, "sample.concurrency=2", "sample.max_tokens=16",
                     f"theta.url=[{servers.url('theta')},{replica.url('model')}]",
                     "theta.max_retries=1")
    run_killing_a_replica(cmd, replica, "model", out)
    check_dataset(out, len(PROMPTS))


def test_a_resume_against_servers_of_other_checkpoints_is_refused(servers, tmp_path):
    """Real servers: a run records its transport and both checkpoints' fingerprints (as the
    servers' plugin computes them: equal to `fingerprint` of the served directories); the
    same command resumed with the two servers' roles swapped (theta now served from another
    checkpoint, as with a server restarted on one) exits 2 naming both models, and writes
    no record. On the code before, it exited 0 and appended the other models' samples."""
    from dual_sampling.vllm_plugin.fingerprint import fingerprint
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:4])
    out = tmp_path / "out"
    run_sample(servers, prompts, out, "data.limit=2")
    params = json.loads((out / "run_params.json").read_text())
    record = next(read_records(out / "samples.jsonl"))
    assert params["transport"] == "session"
    assert [t["fingerprint"] for t in params["theta"]] == [fingerprint(record["theta_path"])]
    assert params["target"]["fingerprint"] == fingerprint(params["target"]["path"]) != (
        params["theta"][0]["fingerprint"])
    swapped = [arg.replace(servers.url("theta"), "THETA").replace(servers.url("target"),
                                                                   servers.url("theta"))
               .replace("THETA", servers.url("target"))
               for arg in sample_cmd(servers, prompts, out)]
    done = subprocess.run(swapped, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "holds samples drawn with other settings or models" in done.stderr
    assert "theta " in done.stderr and "target " in done.stderr and "new output_dir" in done.stderr
    assert len(list(read_records(out / "samples.jsonl"))) == 2
    run_sample(servers, prompts, out)  # the servers it started with: it resumes
    check_dataset(out, 4)


def test_a_resume_with_other_token_settings_is_refused(tmp_path):
    """A run started again on its output_dir with another temperature (or alpha, top_k,
    max_tokens, stop, seed) is refused before any sample: its samples would come from
    another distribution than the ones it resumes (the demo once resumed a T = 1 dataset at
    T = 0.7 and reported 0.7)."""
    from dual_sampling.errors import ConfigError
    from dual_sampling.files.run_files import RUN_PARAMS_FILE
    from dual_sampling.modes.sample import check_resume

    check_resume(tmp_path, settings(temperature=1.0, stop=["\n"]), "fused", models())
    check_resume(tmp_path, settings(temperature=1.0, stop=["\n"], n=4, concurrency=2), "fused",
                 models())
    for changed, key in ((dict(temperature=0.7), "sample.temperature=1.0 there, 0.7 now"),
                         (dict(alpha=0.5), "sample.alpha=None there, 0.5 now"),
                         (dict(stop=[]), "sample.stop"), (dict(seed=1), "seed=0 there")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_resume(tmp_path, settings(**{"temperature": 1.0, "stop": ["\n"], **changed}),
                         "fused", models())
    assert json.loads((tmp_path / RUN_PARAMS_FILE).read_text())["sample.temperature"] == 1.0


def settings(**params):
    """The part of a SampleRunConfig that check_resume reads."""
    from types import SimpleNamespace

    from dual_sampling.config import SampleParams
    return SimpleNamespace(seed=params.pop("seed", 0), sample=SampleParams(**params))


def models(theta="sha256:aaaa", target="sha256:bbbb", theta_version=0):
    """`Sampling.models` of a pair whose checkpoints have these fingerprints."""
    return {"theta": {"model": "theta", "path": "/ckpt/theta", "fingerprint": theta,
                      "theta_version": theta_version},
            "target": {"model": "target", "path": "/ckpt/target", "fingerprint": target}}


def test_a_resume_on_other_models_or_transport_is_refused(tmp_path):
    """The resume that once appended another theta's samples without a word (a fused server
    restarted on another checkpoint) is refused naming what changed, as is another target or
    another transport (fused = exact q*, session = q* over the merged top-k); a theta that
    load_theta put into the running server (theta_version > 0) is the documented way to move
    a run on to a new policy, accepted and listed; a server reporting no fingerprint (no
    plugin) is compared by checkpoint path."""
    from dual_sampling.errors import ConfigError
    from dual_sampling.files.run_files import RUN_PARAMS_FILE
    from dual_sampling.modes.sample import check_resume

    check_resume(tmp_path, settings(), "fused", models())
    for transport, changed, key in (
            ("fused", models(theta="sha256:cccc"), "theta /ckpt/theta (sha256:aaaa) there, "
                                                   "/ckpt/theta (sha256:cccc) now"),
            ("fused", models(target="sha256:cccc"), "target /ckpt/target (sha256:bbbb) there"),
            ("session", models(), "transport 'fused' there, 'session' now")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            check_resume(tmp_path, settings(), transport, changed)
    check_resume(tmp_path, settings(), "fused", models(theta="sha256:dddd", theta_version=1))
    check_resume(tmp_path, settings(), "fused", models())  # back on the first policy
    found = json.loads((tmp_path / RUN_PARAMS_FILE).read_text())
    assert [t["fingerprint"] for t in found["theta"]] == ["sha256:aaaa", "sha256:dddd"]
    stock = models(theta=None, target=None)
    check_resume(tmp_path / "stock", settings(), "request", stock)
    stock["target"]["path"] = "/ckpt/other"
    with pytest.raises(ConfigError, match="target /ckpt/target"):
        check_resume(tmp_path / "stock", settings(), "request", stock)


def test_a_resume_into_another_shards_output_dir_is_refused(tmp_path):
    """`-m ... data.shard_index=1` re-run into the job dir of shard 0 would mix two shards in
    one job: refused naming the keys; the same shard with a greater n resumes."""
    from types import SimpleNamespace

    from dual_sampling.config import SampleParams
    from dual_sampling.errors import ConfigError
    from dual_sampling.files.run_files import SHARD_FILE
    from dual_sampling.modes.sample import write_shard

    def config(shard_index, num_shards=2, n=1):
        return SimpleNamespace(sample=SampleParams(n=n), data=SimpleNamespace(
            prompts=str(tmp_path / "p.jsonl"), shard_index=shard_index, num_shards=num_shards,
            limit=None))

    write_shard(tmp_path, config(0), 10)
    write_shard(tmp_path, config(0, n=3), 10)
    for shard_index, num_shards, key in ((1, 2, "data.shard_index=0 there, 1 now"),
                                         (0, 4, "data.num_shards=2 there, 4 now")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            write_shard(tmp_path, config(shard_index, num_shards), 10)
    assert json.loads((tmp_path / SHARD_FILE).read_text())["n"] == 3
