"""Jobs that serve themselves (`server.launch=fused`): sharded over Hydra's local launcher
and over a local Ray, merged into one dataset equal, token for token, to one job over all
prompts; an engine killed mid-run and a job stopped with SIGTERM lose nothing and leave no
vLLM process behind; bad input is refused before any engine starts.

Every job here starts a real vLLM CPU engine through start_vllm.sh (about 40 s each on 2
cores); the reference dataset comes from the session's fused server on the same checkpoints
(fused tokens depend on the seed, not on batching or on which engine drew them).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dual_sampling.files.run_lock import run_lock

PROMPTS = Path(__file__).resolve().parents[1] / "dual_sampling" / "assets" / "prompts.jsonl"
TOKEN_SETTINGS = ["sample.max_tokens=48", "sample.n=2", "seed=3", "sample.report=false",
                  "progress=false", f"data.prompts={PROMPTS}"]
NUM_PROMPTS = 10


def cli(*overrides: str, multirun: bool = False) -> subprocess.Popen:
    """`python -m dual_sampling [-m] mode=sample ...` as a user runs it (output piped)."""
    return subprocess.Popen([sys.executable, "-m", "dual_sampling", *(["-m"] if multirun else []),
                             "mode=sample", *TOKEN_SETTINGS, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def self_serving(models: dict[str, Path]) -> list[str]:
    return ["server.launch=fused", f"server.theta={models['theta']}",
            f"server.target={models['target']}", "server.max_model_len=512"]


def records_by_key(path: Path) -> dict[tuple[int, int], dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keyed = {(r["index"], r["sample_index"]): r for r in records}
    assert len(keyed) == len(records), f"{path} holds a sample twice"
    return keyed


def vllm_pids() -> set[int]:
    """Every vLLM API server and engine process on this machine."""
    found = subprocess.run(["pgrep", "-f", "vllm.entrypoints|VLLM::"], capture_output=True,
                           text=True).stdout.split()
    return {int(pid) for pid in found}


def assert_no_new_vllm(before: set[int], deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while (left := vllm_pids() - before) and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, f"vLLM processes left behind: {left}"


def wait_for_samples(path: Path, at_least: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= at_least:
            return
        assert proc.poll() is None, f"the job ended early: {proc.communicate()[0][-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {at_least} samples in {path} within {timeout} s")


def assert_same_tokens(merged: dict, reference: dict) -> None:
    assert sorted(merged) == sorted(reference) == [(i, s) for i in range(NUM_PROMPTS) for s in (0, 1)]
    for key, record in reference.items():
        assert merged[key]["completion_token_ids"] == record["completion_token_ids"], key
        # same tokens from the same weights: the float32 logprobs agree to the last bits
        # that batching can move (the fused tests measure 1e-6 on this pair)
        assert max(abs(a - b) for a, b in zip(merged[key]["logp_q"], record["logp_q"])) < 1e-5


@pytest.fixture(scope="module")
def reference(fused_server, fused_models, tmp_path_factory) -> dict:
    """One job over all prompts, on the session's fused server (same checkpoints)."""
    out = tmp_path_factory.mktemp("reference")
    code, log = finish(cli(f"theta.url={fused_server.url('fused')}", "sample.transport=fused",
                           f"output_dir={out}"))
    assert code == 0, log[-3000:]
    return records_by_key(out / "samples.jsonl")


LAUNCHERS = {
    "local": ["hydra/launcher=local"],
    # a local Ray on this machine's 2 cores: one CPU and no GPU per job
    "ray": ["hydra/launcher=ray_jobs", "hydra.launcher.ray.remote.num_cpus=1",
            "hydra.launcher.ray.remote.num_gpus=0", "+hydra.launcher.ray.init.num_cpus=2",
            "+hydra.launcher.ray.init.include_dashboard=false"],
}


@pytest.mark.server
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_self_serving_shards_merge_into_the_one_job_dataset(launcher, reference, fused_models,
                                                                 tmp_path):
    before = vllm_pids()
    run_dir = tmp_path / "run"
    code, log = finish(cli(*LAUNCHERS[launcher], *self_serving(fused_models), "data.num_shards=2",
                           "data.shard_index=0,1", f"output_dir={run_dir}", multirun=True),
                       timeout=900)
    assert code == 0, log[-3000:]
    assert_no_new_vllm(before)
    assert sorted(p.name for p in run_dir.glob("job*")) == ["job0", "job1"]
    merge = subprocess.run([sys.executable, "-m", "dual_sampling.merge", str(run_dir)],
                           capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr
    assert_same_tokens(records_by_key(run_dir / "samples.jsonl"), reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_sequences"] == 2 * NUM_PROMPTS


@pytest.mark.server
def test_a_stopped_or_killed_engine_loses_nothing_and_leaves_no_process(reference, fused_models,
                                                                        tmp_path):
    """SIGTERM to the job, then SIGKILL of its engine, then a run to the end: one dataset,
    complete, nothing doubled, the same tokens as one uninterrupted job."""
    before = vllm_pids()
    out = tmp_path / "run" / "job0"
    samples, pid_file = out / "samples.jsonl", out / "engine" / "fused.pid"
    command = [*self_serving(fused_models), "sample.concurrency=1", f"output_dir={out}"]

    job = cli(*command)
    wait_for_samples(samples, 1, job)
    engine_pid = int(pid_file.read_text())
    os.kill(job.pid, signal.SIGTERM)
    code, log = finish(job)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "stopping the engine" in log
    assert_no_new_vllm(before)
    # gone, or a zombie left unreaped by this container's init
    stat = Path(f"/proc/{engine_pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"

    job = cli(*command)
    written = len(samples.read_text().splitlines())
    wait_for_samples(samples, written + 1, job)
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    code, log = finish(job)
    assert code == 2, log[-3000:]
    error = log.strip().splitlines()[-1]
    assert error.startswith("error: ServerError: theta server at http://127.0.0.1:"), error
    assert "fused engine exited" in error and "Run the same command again" in error, error
    assert_no_new_vllm(before)

    code, log = finish(cli(*command))
    assert code == 0, log[-3000:]
    assert_no_new_vllm(before)
    assert_same_tokens(records_by_key(samples), reference)


@pytest.mark.server
def test_a_job_killed_outright_has_its_engine_stopped_by_the_watchdog(fused_models, tmp_path):
    """SIGKILL of the job itself runs none of its handlers: start_vllm.sh --watch-pid does."""
    before = vllm_pids()
    out = tmp_path / "run"
    job = cli(*self_serving(fused_models), "sample.concurrency=1", f"output_dir={out}")
    wait_for_samples(out / "samples.jsonl", 1, job)
    job.kill()
    job.wait()
    assert_no_new_vllm(before, deadline_s=30)


@pytest.mark.parametrize("overrides, named", [
    (["data.num_shards=2", "data.shard_index=2"], "data.shard_index"),
    (["server.launch=fused"], "server.theta"),
    (["server.launch=pair", "server.theta=/nowhere"], "server.target"),
    (["server.launch=all", "server.theta=a", "server.target=b"], "server.launch"),
    (["server.launch=pair", "server.theta=a", "server.target=b", "server.speculate=4"],
     "server.speculate"),
    (["server.launch=fused", "server.theta=a", "server.target=b", "server.speculate=4:0"],
     "server.speculate"),
])
def test_bad_input_is_refused_before_any_engine_starts(overrides, named, tmp_path):
    out = tmp_path / "run"
    code, log = finish(cli(*overrides, f"output_dir={out}"))
    assert code == 2, log[-2000:]
    assert f"`{named}`" in log.strip().splitlines()[-1]
    assert not (out / "engine").exists()


def test_two_runs_on_one_output_dir_are_refused(tiny_models, tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        code, log = finish(cli(*self_serving(tiny_models), f"output_dir={out}"))
    assert code == 2, log[-2000:]
    assert "is in use by another run (pid" in log.strip().splitlines()[-1]
    assert not (out / "engine").exists()
