"""API keys: servers started with a key (start_vllm.sh --api-key, or VLLM_API_KEY) and every
client of this package sending it, against real vLLM CPU servers of the tiny pair.

The module starts its own keyed servers once, all at the same time: theta and a fused server
through `Servers(api_key=...)` (the key in start_vllm.sh's environment, as in the reported
`--fused` case), target through `start_vllm.sh --api-key KEY` with an empty VLLM_API_KEY.
Sample (session and fused transports), score, topk, load_theta and the Python API run with
the key; runs without it or with a wrong one are refused with AuthenticationError naming the
server; and the key is found in no file a run or a server wrote, nor on a server's command
line.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from dual_sampling import DualSampler
from dual_sampling.clients.client import VLLMClient
from dual_sampling.config import (ScoreDataConfig, ScoreRunConfig, SequenceDataConfig,
                                  ServerConfig, TopkParams, TopkRunConfig, WandbConfig)
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.errors import AuthenticationError, ConfigError
from dual_sampling.files.records import read_records
from dual_sampling.models.tiny_models import perturbed_checkpoint
from dual_sampling.modes import score, topk
from dual_sampling.serving.launch import Servers
from dual_sampling.wire.topk_format import read_index

pytestmark = pytest.mark.server

KEY = "ds-test-key-7c1e9b40f2a3"  # a string no other file of a run holds by chance
WRONG_KEY = "ds-wrong-key-55d0e8"
START_TIMEOUT_S = 300  # start_vllm.sh --timeout: a server that refused the key would hit it
PROMPTS = [f"Prompt {i}: the standard library" for i in range(4)]


@pytest.fixture(scope="module")
def keyed(tiny_models, tmp_path_factory):
    """theta and fused (key in the environment) and target (key as --api-key), started
    together; `start_s`: how long until all three answered."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    root = tmp_path_factory.mktemp("vllm_keyed")
    models = dict(tiny_models)
    servers = {
        "theta": Servers(run_dir=root / "theta", models=models, api_key=KEY,
                         timeout_s=START_TIMEOUT_S),
        "target": Servers(run_dir=root / "target", models=models, env={"VLLM_API_KEY": ""},
                          script_args=("--api-key", KEY), timeout_s=START_TIMEOUT_S),
        "fused": Servers(run_dir=root / "fused", models=models, api_key=KEY,
                         timeout_s=START_TIMEOUT_S)}
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(3) as pool:
            for started in [pool.submit(servers["theta"].start, "theta"),
                            pool.submit(servers["target"].start, "target"),
                            pool.submit(servers["fused"].start_fused)]:
                started.result()
        yield {**servers, "start_s": time.monotonic() - start}
    finally:
        for role_servers in servers.values():
            role_servers.stop()


def url(keyed, role: str) -> str:
    return keyed[role].url(role)


def env_with(**keys: str) -> dict[str, str]:
    """os.environ without any VLLM_API_KEY of its own, plus `keys`."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    return {**env, **keys}


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def sample_run(keyed, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    prompts = cwd / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cmd = [sys.executable, "-m", "dual_sampling", "mode=sample",
           f"theta.url={url(keyed, 'theta')}", f"target.url={url(keyed, 'target')}",
           "target.api_key_env=TARGET_KEY", f"data.prompts={prompts}",
           f"output_dir={cwd / 'out'}", "sample.transport=session", "sample.max_tokens=8",
           "sample.concurrency=4", "progress=false", "wandb.mode=offline"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_start_vllm_sh_with_a_key_is_ready_without_waiting_out_its_timeout(keyed):
    # every server answered /v1/models with the key: a server that refused start_vllm.sh's
    # readiness probe would have failed it at once or after START_TIMEOUT_S
    assert keyed["start_s"] < START_TIMEOUT_S - 60, keyed["start_s"]
    print(f"keyed theta, target and fused up in {keyed['start_s']:.0f} s")


def test_sample_with_the_key_over_sessions_and_no_file_holds_it(keyed, tmp_path):
    done = sample_run(keyed, tmp_path, env_with(VLLM_API_KEY=KEY, TARGET_KEY=KEY))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = list(read_records(tmp_path / "out" / "samples.jsonl"))
    assert sorted(r["index"] for r in records) == list(range(len(PROMPTS)))
    assert all(r["num_tokens"] >= 1 for r in records)
    assert list((tmp_path / "out").rglob("wandb")) and list(tmp_path.rglob(".hydra"))
    assert files_holding(tmp_path, KEY) == []  # output_dir, .hydra, wandb, overrides, logs
    assert KEY not in done.stdout + done.stderr


@pytest.mark.parametrize("theta_key,sent", [(None, "no API key was sent"),
                                             (WRONG_KEY, "the API key sent was not accepted")])
def test_sample_without_the_key_or_with_a_wrong_one_is_refused(keyed, tmp_path, theta_key, sent):
    keys = {"TARGET_KEY": KEY, **({"VLLM_API_KEY": theta_key} if theta_key else {})}
    done = sample_run(keyed, tmp_path, env_with(**keys))
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"AuthenticationError: theta server at {url(keyed, 'theta')}" in done.stderr
    assert sent in done.stderr and "`theta.api_key_env`" in done.stderr
    samples = tmp_path / "out" / "samples.jsonl"
    assert not samples.exists() or samples.stat().st_size == 0
    for secret in (KEY, WRONG_KEY):
        assert secret not in done.stdout + done.stderr
        assert files_holding(tmp_path, secret) == []


def test_score_and_topk_with_the_key(keyed, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "completion": " and more"}) + "\n"
                             for p in PROMPTS))
    score.run(ScoreRunConfig(
        output_dir=str(tmp_path / "score"), theta=ServerConfig(url=url(keyed, "theta")),
        target=ServerConfig(url=url(keyed, "target")), data=ScoreDataConfig(path=str(pairs)),
        wandb=WandbConfig(mode="disabled"), progress=False))
    scores = list(read_records(tmp_path / "score" / "scores.jsonl"))
    assert len(scores) == len(PROMPTS) and all(r["sum_logp_target"] < 0 for r in scores)

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    topk.run(TopkRunConfig(
        output_dir=str(tmp_path / "topk"), teacher=ServerConfig(url=url(keyed, "theta")),
        data=SequenceDataConfig(path=str(texts)), topk=TopkParams(k=8, shard_size=4),
        wandb=WandbConfig(mode="disabled"), progress=False))
    cached = sorted(i for entry in read_index(tmp_path / "topk") for i in entry["sequence_ids"])
    assert cached == list(range(len(PROMPTS)))
    assert files_holding(tmp_path, KEY) == []

    monkeypatch.delenv("VLLM_API_KEY")
    with pytest.raises(AuthenticationError, match=r"teacher server at .* no API key was sent"):
        topk.run(TopkRunConfig(
            output_dir=str(tmp_path / "topk_refused"),
            teacher=ServerConfig(url=url(keyed, "theta")),
            data=SequenceDataConfig(path=str(texts)), wandb=WandbConfig(mode="disabled"),
            progress=False))


def test_load_theta_and_the_python_api_with_the_key(keyed, tiny_models, tmp_path, monkeypatch):
    theta_b = perturbed_checkpoint(tiny_models["theta"], tmp_path / "theta_b", scale=0.3)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    async def go() -> None:
        async with DualSampler(url(keyed, "theta"), url(keyed, "target"), transport="session",
                               api_key=KEY) as sampler:
            before = (await sampler.describe())[0].theta_version
            (loaded,) = await sampler.load_theta(str(theta_b))
            assert loaded["theta_version"] == before + 1
            records = await sampler.sample(PROMPTS[:2], max_tokens=4, seed=1)
            assert [r["theta_version"] for r in records] == [before + 1] * 2
            await sampler.load_theta(str(tiny_models["theta"]))
        async with DualSampler(url(keyed, "theta"), url(keyed, "target")) as sampler:
            with pytest.raises(AuthenticationError) as refused:
                await sampler.load_theta(str(theta_b))
        message = str(refused.value)
        assert f"theta server at {url(keyed, 'theta')}" in message
        assert "no API key was sent" in message and "DualSampler(api_key=...)" in message
        monkeypatch.setenv("VLLM_API_KEY", KEY)  # the default: DualSampler reads it
        async with DualSampler(url(keyed, "theta"), url(keyed, "target")) as sampler:
            assert (await sampler.describe())[0].theta_version == before + 2

    asyncio.run(go())


def test_fused_sampling_with_the_key_and_refused_without(keyed, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    async def go(key: str | None) -> list[dict]:
        async with DualSampler(url(keyed, "fused"), api_key=key) as sampler:
            return await sampler.sample(PROMPTS, n=2, max_tokens=8, seed=3)

    records = asyncio.run(go(KEY))
    assert len(records) == 2 * len(PROMPTS) and all(r["num_tokens"] >= 1 for r in records)
    with pytest.raises(AuthenticationError, match=rf"theta server at {url(keyed, 'fused')} "
                                                  rf"\(GET /v1/models\) answered HTTP 401"):
        asyncio.run(go(WRONG_KEY))


def test_the_session_websocket_asks_for_the_key(keyed):
    """The WebSocket handshake itself is refused without the key (not only the HTTP calls a
    run makes before it)."""
    async def step(key: str | None) -> None:
        async with VLLMClient(url(keyed, "theta"), name="theta", api_key=key) as theta, \
                VLLMClient(url(keyed, "target"), name="target", api_key=key) as target:
            async with SessionTransport(theta, target, max_retries=0) as transport:
                await transport.step([0], [[1, 2, 3]], 4)

    asyncio.run(step(KEY))
    with pytest.raises(AuthenticationError, match=r"server at .*\(/v1/dual_sampling/session\) "
                                                  r"answered HTTP 401: no API key was sent"):
        asyncio.run(step(None))


def test_api_key_env_must_be_a_variable_name_and_is_not_echoed():
    ServerConfig(api_key_env="THETA_API_KEY").check("theta")
    with pytest.raises(ConfigError, match=r"`theta\.api_key_env` is invalid") as bad:
        ServerConfig(api_key_env="sk-live-0123").check("theta")
    assert "sk-live-0123" not in str(bad.value)


def test_no_server_log_run_dir_or_command_line_holds_the_key(keyed):
    """Last in the module: after every request above, the servers' run dirs (logs, pid
    files) and the server processes' command lines hold no key."""
    for role in ("theta", "target", "fused"):
        servers = keyed[role]
        assert files_holding(servers.run_dir, KEY) == []
        assert files_holding(servers.run_dir, WRONG_KEY) == []
        server = psutil.Process(int((servers.run_dir / f"{role}.pid").read_text()))
        for process in [server, *server.children(recursive=True)]:
            assert KEY not in " ".join(process.cmdline())
    assert KEY not in repr(keyed["theta"])  # target's start_vllm.sh --api-key was argv by choice
