"""load_theta and the Python API (DualSampler) on real vLLM CPU servers.

A new theta loaded into a running server must give, token for token, what a fresh server
started on it gives for the same seed (fused, session and request transports), and loading
the first theta back must give the first tokens again. Requests in flight when a load
arrives finish on the old weights; a client pinned to the old version is refused after it;
checkpoints that do not fit are refused by name while the old weights keep serving; swaps
do not grow the server's memory. The shared session servers are always given their first
theta back (`finally`), so the other test modules see the weights they expect.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest

from dual_sampling import DualSampler, SyncDualSampler
from dual_sampling.clients.client import VLLMClient
from dual_sampling.errors import CheckpointRefusedError, ServerError, ThetaChangedError
from dual_sampling.models.tiny_models import perturbed_checkpoint
from dual_sampling.serving.launch import Servers
from dual_sampling.wire.fused_format import GENERATE_PATH as FUSED_PATH

pytestmark = pytest.mark.server

PROMPTS = ["The cat sat on", "Once upon a time", {"prompt": "In the morning the"},
           "A small model"]
SEED = 11
FUSED_EXTRA = ("--max-model-len", "2048", "--max-num-batched-tokens", "512")  # = fused_server's


def tokens(records: list[dict]) -> list[list[int]]:
    return [r["completion_token_ids"] for r in records]


def logps(records: list[dict], name: str) -> np.ndarray:
    return np.concatenate([r[name] for r in records])


def sample(sampler: SyncDualSampler) -> list[dict]:
    return sampler.sample(PROMPTS, n=2, max_tokens=16, seed=SEED)


@pytest.fixture(scope="module")
def theta_b(tiny_models, tmp_path_factory) -> Path:
    """Another policy of theta's shapes (theta's weights + noise): what a training step writes."""
    return perturbed_checkpoint(tiny_models["theta"], tmp_path_factory.mktemp("b") / "theta_b",
                                scale=0.3, seed=1)


@pytest.fixture(scope="module")
def fresh_b(theta_b, fused_models, tmp_path_factory):
    """Servers started on theta B: one fused (with fused_server's target), one plain theta."""
    fused = Servers(run_dir=tmp_path_factory.mktemp("vllm_b_fused"),
                    models={"theta": theta_b, "target": fused_models["target"]},
                    extra=FUSED_EXTRA)
    plain = Servers(run_dir=tmp_path_factory.mktemp("vllm_b_plain"), models={"theta": theta_b})
    try:
        fused.start_fused()
        plain.start("theta")
        yield {"fused": fused.url("fused"), "theta": plain.url("theta")}
    finally:
        fused.stop()
        plain.stop()


def swap_and_back(url: str, target: str | None, transport: str, theta_b: Path, theta_a: Path
                  ) -> tuple[list, list, list, int]:
    """Sample on A, load B, sample, load A back, sample; the three batches and A's version."""
    with SyncDualSampler(url, target, transport=transport) as sampler:
        version = sampler.describe()[0].theta_version
        first = sample(sampler)
        try:
            (reply,) = sampler.load_theta(str(theta_b))
            assert reply["theta_version"] == version + 1 and reply["load_s"] > 0
            swapped = sample(sampler)
        finally:
            sampler.load_theta(str(theta_a))
        again = sample(sampler)
    return first, swapped, again, version


def check_swap(first, swapped, again, fresh, version, theta_a, theta_b, names) -> None:
    assert tokens(swapped) == tokens(fresh)
    for name in names:
        np.testing.assert_allclose(logps(swapped, name), logps(fresh, name), atol=1e-5)
    assert tokens(swapped) != tokens(first)  # B is another policy: the check can fail
    assert tokens(again) == tokens(first)
    for name in names:
        np.testing.assert_allclose(logps(again, name), logps(first, name), atol=1e-6)
    assert {(r["theta_version"], r["theta_path"]) for r in first} == {(version, str(theta_a))}
    assert {(r["theta_version"], r["theta_path"]) for r in swapped} == {
        (version + 1, str(theta_b))}
    assert {r["theta_version"] for r in again} == {version + 2}


def test_fused_load_theta_gives_a_fresh_servers_tokens_then_the_first_ones_back(
        fused_server, fresh_b, fused_models, theta_b):
    first, swapped, again, version = swap_and_back(
        fused_server.url("fused"), None, "fused", theta_b, fused_models["theta"])
    with SyncDualSampler(fresh_b["fused"]) as sampler:
        fresh = sample(sampler)
    check_swap(first, swapped, again, fresh, version, fused_models["theta"], theta_b,
               ("logp_theta", "logp_target", "logp_q", "alpha"))


@pytest.mark.parametrize("transport", ["session", "request"])
def test_two_server_load_theta_gives_a_fresh_servers_tokens_then_the_first_ones_back(
        servers, fresh_b, tiny_models, theta_b, transport):
    target = servers.url("target")
    first, swapped, again, version = swap_and_back(
        servers.url("theta"), target, transport, theta_b, tiny_models["theta"])
    with SyncDualSampler(fresh_b["theta"], target, transport=transport) as sampler:
        fresh = sample(sampler)
    check_swap(first, swapped, again, fresh, version, tiny_models["theta"], theta_b,
               ("logp_theta", "logp_target", "logp_q"))


def test_score_after_load_theta_is_a_fresh_servers_score(servers, fresh_b, tiny_models,
                                                        theta_b):
    """DualSampler.score under theta (and the target): B's logprobs once B is loaded, with
    B's version in every record; A's again once A is back."""
    completions = [" the mat and slept.", [" was a king.", " there lived a cat."],
                   " sun rose.", " can learn."]
    target = servers.url("target")

    def score(url: str) -> list[dict]:
        with SyncDualSampler(url, target) as sampler:
            return sampler.score(PROMPTS, completions)

    first = score(servers.url("theta"))
    with SyncDualSampler(servers.url("theta"), target) as sampler:
        version = sampler.describe()[0].theta_version
        try:
            sampler.load_theta(str(theta_b))
            swapped = sampler.score(PROMPTS, completions)
        finally:
            sampler.load_theta(str(tiny_models["theta"]))
    fresh, again = score(fresh_b["theta"]), score(servers.url("theta"))
    assert [(r["index"], r["completion_index"]) for r in swapped] == [
        (0, 0), (1, 0), (1, 1), (2, 0), (3, 0)]
    for name in ("sum_logp_theta", "sum_logp_target"):
        np.testing.assert_allclose([r[name] for r in swapped], [r[name] for r in fresh],
                                   atol=1e-4)
        np.testing.assert_allclose([r[name] for r in again], [r[name] for r in first],
                                   atol=1e-6)
    assert not np.allclose([r["sum_logp_theta"] for r in swapped],
                           [r["sum_logp_theta"] for r in first], atol=1e-2)
    assert {r["theta_version"] for r in swapped} == {version + 1}
    assert {r["theta_path"] for r in swapped} == {str(theta_b)}
    assert {r["label_prob_theta"] > 0 for r in swapped if r["index"] == 1} == {True}


def test_in_flight_requests_finish_on_the_old_weights_and_pinned_clients_are_refused(
        fused_server, fused_models, theta_b):
    url = fused_server.url("fused")
    body = {"prompts": [[1, 200, 300]], "seeds": [5], "max_tokens": 600, "alpha": None,
            "temperature": 1.0, "stop": [], "ignore_eos": True}

    async def main() -> tuple[dict, dict, dict]:
        async with VLLMClient(url, name="fused") as client, \
                VLLMClient(url, name="loader") as loader, \
                VLLMClient(url, name="pinned") as pinned:
            pinned.pin_theta(await pinned.describe())
            before = await client.request("POST", FUSED_PATH, body)
            in_flight = asyncio.create_task(client.request("POST", FUSED_PATH, body))
            await asyncio.sleep(0.5)
            assert not in_flight.done(), "the request must still be generating"
            try:
                reply = await loader.load_theta(str(theta_b))
                assert in_flight.done()  # the swap waited for it
                assert reply["load_s"] > 0
                with pytest.raises(ThetaChangedError, match="theta changed.*pinned to version"):
                    await pinned.request("POST", FUSED_PATH, {**body, "max_tokens": 2})
                after = await client.request("POST", FUSED_PATH, body)
            finally:
                await loader.load_theta(str(fused_models["theta"]))
            return before, await in_flight, after

    before, during, after = asyncio.run(main())
    assert during["results"][0]["token_ids"] == before["results"][0]["token_ids"]
    assert during["results"][0]["logp_theta"] == before["results"][0]["logp_theta"]
    assert after["results"][0]["token_ids"] != before["results"][0]["token_ids"]


def _copy(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    return out


def test_checkpoints_that_do_not_fit_are_refused_and_the_old_weights_serve_on(
        servers, fused_server, fused_models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    theta = Path(fused_models["theta"])
    reshaped = _copy(theta, tmp_path / "reshaped")
    weights = load_file(reshaped / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(weights["model.norm.weight"].shape[0] + 1)
    save_file(weights, reshaped / "model.safetensors", metadata={"format": "pt"})
    retokenized = _copy(theta, tmp_path / "retokenized")
    tokenizer = json.loads((retokenized / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (retokenized / "tokenizer.json").write_text(json.dumps(tokenizer))
    deeper = _copy(theta, tmp_path / "deeper")
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    cases = {str(tmp_path / "nowhere"): "no checkpoint directory",
             str(deeper): "num_hidden_layers",
             str(reshaped): r"other shapes: model\.norm\.weight",
             str(retokenized): "another tokenizer"}
    with SyncDualSampler(fused_server.url("fused")) as sampler:
        version = sampler.describe()[0].theta_version
        first = sample(sampler)
        try:
            for path, reason in cases.items():
                with pytest.raises(CheckpointRefusedError, match=reason) as refused:
                    sampler.load_theta(path)
                assert f"keeps serving theta_version {version}" in str(refused.value)
                right_after = sample(sampler)
                assert tokens(right_after) == tokens(first)
                assert {r["theta_version"] for r in right_after} == {version}
        finally:
            if sampler.describe()[0].theta_version != version:  # a case loaded: put A back
                sampler.load_theta(str(theta))
    with SyncDualSampler(servers.url("target"), servers.url("target")) as sampler:
        with pytest.raises(CheckpointRefusedError, match="target server"):
            sampler.load_theta(str(theta))


def test_a_load_that_fails_half_way_puts_the_old_weights_back(fused_server, fused_models,
                                                             tmp_path):
    """Headers that pass the checks over a truncated body: vLLM's loader fails mid-load."""
    broken = _copy(Path(fused_models["theta"]), tmp_path / "truncated")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with SyncDualSampler(fused_server.url("fused")) as sampler:
        version = sampler.describe()[0].theta_version
        first = sample(sampler)
        with pytest.raises(ServerError):
            sampler.load_theta(str(broken))
        (info,) = sampler.describe()
        assert info.theta_version == version and info.theta_path == str(fused_models["theta"])
        assert tokens(sample(sampler)) == tokens(first)


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_five_swaps_do_not_grow_the_servers_memory(wide_fused_server, wide_models, tmp_path):
    """On the 151,936-id pair, where theta's weights are large enough to see (tens of MB)."""
    theta = Path(wide_models["theta"])
    other = perturbed_checkpoint(theta, tmp_path / "wide_b", scale=0.1, seed=2)
    size = sum(f.stat().st_size for f in theta.glob("*.safetensors"))
    pid = int((wide_fused_server.run_dir / "fused.pid").read_text())
    url = wide_fused_server.url("fused")

    async def swaps() -> list[int]:
        async with DualSampler(url) as sampler:
            await sampler.load_theta(str(other))  # the first load maps the loader's code
            await sampler.load_theta(str(theta))
            rss = [tree_rss(pid)]
            try:
                for path in (other, theta, other, theta, other):
                    await sampler.load_theta(str(path))
                    await sampler.sample(["The cat"], max_tokens=4)
                    rss.append(tree_rss(pid))
            finally:
                await sampler.load_theta(str(theta))
            return rss

    rss = asyncio.run(swaps())
    assert max(rss) - rss[0] < size, (f"RSS grew by {(max(rss) - rss[0]) / 2**20:.1f} MiB "
                                      f"over five swaps; theta is {size / 2**20:.1f} MiB")


def readme_round_loop() -> str:
    """docs/api.md's round-loop example, as written."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    match = re.search(r"<!-- round-loop -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "docs/api.md lost its round-loop example (marked <!-- round-loop -->)"
    return match.group(1)


def test_the_readmes_round_loop_runs_as_written(fused_server, fused_models, tmp_path,
                                                monkeypatch):
    """On a fused server, as the demo starts (its URL in for the demo's), three rounds."""
    code = readme_round_loop().replace("http://127.0.0.1:8000", fused_server.url("fused"))
    code = code.replace(".cache/tiny_models/theta", str(fused_models["theta"]))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    try:
        exec(compile(code, "README.md round loop", "exec"), scope)
    finally:
        with SyncDualSampler(fused_server.url("fused")) as sampler:
            sampler.load_theta(str(fused_models["theta"]))
    versions = [r["theta_version"] for r in scope["records"]]
    assert len(set(versions)) == 1 and os.path.isdir(tmp_path / "ckpt")
