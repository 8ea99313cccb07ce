"""The fused transport against a real fused vLLM CPU server (theta + a padded target).

Every generated position is recomputed with transformers (dual_sampling/models/reference.py) over
the full vocabulary; sampled tokens are tested against q* with a chi-square test; sample
mode runs end to end through the real entry point, killed and resumed. The guards of
start_vllm.sh --fused need no server.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dual_sampling.clients.client import ServerInfo
from dual_sampling.config import SampleParams
from dual_sampling.core.sampling import wants_fused
from dual_sampling.core.transports.fused import prompt_seed
from dual_sampling.errors import ConfigError, ServerMismatchError
from dual_sampling.files.records import read_records
from dual_sampling.maths import mixture
from dual_sampling.serving.launch import START_SCRIPT, Servers
from dual_sampling.vllm_plugin.fused.setup import FusedSetupError, hf_overrides
from dual_sampling.wire.fused_format import ENGINE_PATH
from helpers import (PROMPTS, assert_batch_invariant_and_greedy_is_the_argmax, check_dataset,
                     chernoff_alpha, chi_square_p, encode, generate, run_killing_a_replica,
                     run_sample, sample_cmd, tokens_of, wait_for_records, write_prompts)

VOCAB = 1024  # the tokenizer's; the padded target has 1088 output rows
@pytest.fixture(scope="module")
def reference(fused_models):
    from dual_sampling.models.reference import Reference
    return Reference(fused_models)


# -- against transformers ---------------------------------------------------------------------
def assert_every_position_matches(server: Servers, reference, prompts: list[list[int]],
                                  seeds: list[int], max_tokens: int) -> int:
    """alpha within 1e-5 of scipy's Chernoff point on transformers' logprobs, or within what
    float32 forward noise allows: engine and transformers logprobs differ by ~1e-6, which
    moves g = E_q[logp_target - logp_theta] by up to ~2e-6 and alpha* by that over
    Var_q[d] (1e-4 at the flattest positions here). The engine's own alpha is exact for its
    own inputs: the two KLs it reports are equal to 1e-6 * Var_q[d]. Returns the positions
    checked."""
    results = generate(server, prompts, seeds, max_tokens=max_tokens)
    checked = 0
    for prompt, result in zip(prompts, results):
        ids = prompt + result["token_ids"]
        full_theta = reference.full_logprobs("theta", ids)  # (L, V)
        full_target = reference.full_logprobs("target", ids)  # (L, V)
        for t, token in enumerate(result["token_ids"]):
            a, b = full_theta[len(prompt) - 1 + t], full_target[len(prompt) - 1 + t]
            alpha = chernoff_alpha(a, b)
            log_q = mixture.log_mixture(a, b, alpha)
            q, d = np.exp(log_q), b - a
            var = q @ (d * d) - (q @ d) ** 2  # (log Z)'' at alpha*
            assert abs(result["alpha"][t] - alpha) <= max(1e-5, 2e-6 / var)
            assert abs(result["kl_q_theta"][t] - result["kl_q_target"][t]) <= 1e-6 * var
            diag = mixture.token_diagnostics(a, b, log_q)
            assert token < reference.vocab_size
            np.testing.assert_allclose(
                [result[f][t] for f in ("logp_theta", "logp_target", "logp_q", "kl_q_theta",
                                        "kl_q_target", "entropy_q")],
                [a[token], b[token], log_q[token], diag["kl_q_theta"], diag["kl_q_target"],
                 diag["entropy_q"]], atol=1e-3)
            checked += 1
    return checked


@pytest.mark.server
def test_every_position_matches_the_full_vocabulary_reference(fused_server, reference):
    prompts = [encode(reference, p) for p in PROMPTS[:3]]
    assert assert_every_position_matches(fused_server, reference, prompts, [11, 12, 13],
                                         max_tokens=16) >= 40


@pytest.fixture(scope="module")
def hetero_server(tmp_path_factory):
    """A fused server of a pair with different KV layouts: theta 2 layers of 2 KV heads x 64,
    target 3 layers of 8 heads, 4 KV heads x 128 (dual_sampling/models/shaped_models.py; random
    weights, peaked heads, the tiny pair's tokenizer). Up for this module only."""
    from dual_sampling.models.shaped_models import make_pair
    models = make_pair(tmp_path_factory.mktemp("hetero"), "tiny-64", "tiny-128")
    server = Servers(run_dir=tmp_path_factory.mktemp("vllm_hetero"), models=models)
    server.start_fused()
    yield server
    server.stop()


@pytest.mark.server
def test_a_pair_with_different_kv_layouts_serves_fused_and_matches_transformers(hetero_server):
    """Head size, KV heads and layer count all differ: vLLM holds both stacks in one
    KV-cache group (each layer its own region of a block) and every position is exact."""
    from transformers import AutoConfig

    from dual_sampling.models.reference import Reference
    from dual_sampling.vllm_plugin.fused.setup import kv_bytes_per_token
    models = hetero_server.models
    with urllib.request.urlopen(hetero_server.url("fused") + ENGINE_PATH, timeout=30) as reply:
        engine = json.loads(reply.read())
    configs = {role: AutoConfig.from_pretrained(models[role]) for role in ("theta", "target")}
    expected = sum(kv_bytes_per_token(config, 4) for config in configs.values())  # float32
    assert engine["model_runner"] == "v1" and engine["async_scheduling"] is False  # CPU
    assert engine["kv_cache"]["groups"] == [{"layers": 5, "block_size": 128,
                                             "bytes_per_token": expected,
                                             "kind": "UniformTypeKVCacheSpecs"}]
    assert expected == 2 * 2 * 2 * 64 * 4 + 2 * 3 * 4 * 128 * 4  # 2,048 + 12,288 bytes
    reference = Reference(models)
    prompts = [encode(reference, p) for p in PROMPTS[:3]]
    assert assert_every_position_matches(hetero_server, reference, prompts, [21, 22, 23],
                                         max_tokens=12) == 36


@pytest.mark.server
def test_a_prompt_prefilled_in_chunks_matches_the_reference(fused_server, reference):
    """1200 prompt tokens over a 512-token step budget: the engine samples (and discards)
    at the end of each partial prefill; the records must hold only the real tokens."""
    from dual_sampling.models.tiny_models import corpus_path
    prompt = encode(reference, corpus_path().read_text()[:20000])[:1200]
    result = generate(fused_server, [prompt], [5], max_tokens=6)[0]
    ids = prompt + result["token_ids"]
    full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
    for t, token in enumerate(result["token_ids"]):
        a, b = (f[len(prompt) - 1 + t] for f in full)
        np.testing.assert_allclose([result["logp_theta"][t], result["logp_target"][t]],
                                   [a[token], b[token]], atol=1e-3)
        assert abs(result["alpha"][t] - chernoff_alpha(a, b)) < 1e-3


@pytest.mark.server
def test_sampled_tokens_follow_q_star(fused_server, reference):
    prompt = encode(reference, "The module")
    n = 3000
    results = generate(fused_server, [prompt] * n, list(range(n)), max_tokens=1)
    a, b = reference.position_logprobs(prompt)
    alpha = chernoff_alpha(a, b)
    q = np.exp(mixture.log_mixture(a, b, alpha))
    tokens = [r["token_ids"][0] for r in results]
    assert max(tokens) < VOCAB
    assert np.ptp([r["alpha"][0] for r in results]) < 1e-9
    assert chi_square_p(tokens, q) > 1e-3


@pytest.mark.server
@pytest.mark.parametrize("alpha,model", [(0.0, "theta"), (1.0, "target")])
def test_fixed_alpha_zero_and_one_reproduce_each_model(fused_server, reference, alpha, model):
    prompts = [encode(reference, p) for p in PROMPTS[:2]]
    for result in generate(fused_server, prompts, [1, 2], max_tokens=12, alpha=alpha):
        assert set(result["alpha"]) == {alpha}
        np.testing.assert_allclose(result["logp_q"], result[f"logp_{model}"], atol=1e-5)
        np.testing.assert_allclose(result[f"kl_q_{model}"], 0.0, atol=1e-6)
    prompt = encode(reference, "The module")
    n = 2000
    results = generate(fused_server, [prompt] * n, list(range(n)), max_tokens=1, alpha=alpha)
    logp = reference.position_logprobs(prompt)[0 if model == "theta" else 1]
    assert chi_square_p([r["token_ids"][0] for r in results], np.exp(logp)) > 1e-3


@pytest.mark.server
def test_tokens_do_not_depend_on_batching_and_temperature_zero_is_argmax(fused_server,
                                                                         reference):
    assert_batch_invariant_and_greedy_is_the_argmax(
        fused_server, reference, [encode(reference, p) for p in PROMPTS[:12]], greedy_tokens=8)


@pytest.mark.server
def test_a_real_vocabulary_pair_is_exact_and_batch_invariant(wide_fused_server, wide_models):
    """151,936 ids, all carrying mass (nothing prunable): every position's alpha, logprobs
    and diagnostics against transformers over the full vocabulary, the first token's
    distribution by chi-square, and the same tokens alone, batched and asked again."""
    from dual_sampling.models.reference import Reference
    reference = Reference(wide_models)
    prompts = [encode(reference, p) for p in PROMPTS[:6]]
    batched = generate(wide_fused_server, prompts, [21, 22, 23, 24, 25, 26], max_tokens=10)
    alone = generate(wide_fused_server, prompts[:1], [21], max_tokens=10)[0]
    again = generate(wide_fused_server, prompts[:2], [21, 22], max_tokens=10)
    assert alone["token_ids"] == batched[0]["token_ids"] == again[0]["token_ids"]
    assert again[1]["token_ids"] == batched[1]["token_ids"]
    checked = 0
    for prompt, result in zip(prompts[:2], batched):
        ids = prompt + result["token_ids"]
        full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t, token in enumerate(result["token_ids"]):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            alpha = chernoff_alpha(a, b)
            log_q = mixture.log_mixture(a, b, alpha)
            q, d = np.exp(log_q), b - a
            var = q @ (d * d) - (q @ d) ** 2
            assert abs(result["alpha"][t] - alpha) <= max(1e-5, 2e-6 / var)
            diag = mixture.token_diagnostics(a, b, log_q)
            np.testing.assert_allclose(
                [result[f][t] for f in ("logp_theta", "logp_target", "logp_q")],
                [a[token], b[token], log_q[token]], atol=1e-5)
            np.testing.assert_allclose(
                [result[f][t] for f in ("kl_q_theta", "kl_q_target", "entropy_q")],
                [diag["kl_q_theta"], diag["kl_q_target"], diag["entropy_q"]], atol=1e-4)
            checked += 1
    assert checked == 20
    prompt = encode(reference, "The module")
    n = 600
    results = generate(wide_fused_server, [prompt] * n, list(range(n)), max_tokens=1)
    a, b = reference.position_logprobs(prompt)
    q = np.exp(mixture.log_mixture(a, b, chernoff_alpha(a, b)))
    assert chi_square_p([r["token_ids"][0] for r in results], q) > 1e-3


@pytest.mark.server
def test_a_stock_completion_request_samples_q_star(fused_server):
    body = json.dumps({"model": "fused", "prompt": [0, 51, 85], "max_tokens": 4, "seed": 3})
    request = urllib.request.Request(fused_server.url("fused") + "/v1/completions",
                                     body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["choices"][0]["text"]


# -- sample mode end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_run(fused_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused_sample")
    prompts = write_prompts(tmp / "prompts.jsonl")
    out = tmp / "out"
    done = run_sample(fused_server, prompts, out, "target.url=http://127.0.0.1:9")
    return out, prompts, done


@pytest.mark.server
def test_auto_picks_fused_and_writes_the_same_schema(first_run):
    out, _, done = first_run
    check_dataset(out, len(PROMPTS))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transport"] == "fused" and summary["mean_coverage_theta"] == 1.0
    assert "transport: fused" in done.stdout + done.stderr
    # what a resume is held to: the transport and both checkpoints, as the server reads them
    from dual_sampling.vllm_plugin.fingerprint import fingerprint
    params = json.loads((out / "run_params.json").read_text())
    theta, target = params["theta"][-1], params["target"]
    assert params["transport"] == "fused"
    assert theta["fingerprint"] == fingerprint(theta["path"]) != target["fingerprint"]
    assert target["fingerprint"] == fingerprint(target["path"]) is not None


@pytest.mark.server
def test_same_seed_same_dataset_and_a_sweep_over_alpha(fused_server, first_run, tmp_path):
    out, prompts, _ = first_run
    again = tmp_path / "again"
    run_sample(fused_server, prompts, again, "sample.transport=fused")
    assert tokens_of(again) == tokens_of(out)
    sweep = tmp_path / "sweep"
    done = subprocess.run(sample_cmd(fused_server, prompts, sweep, "data.limit=2",
                                     "sample.alpha=0,1", multirun=True),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for job, alpha in ((0, 0.0), (1, 1.0)):
        for r in read_records(sweep / f"job{job}" / "samples.jsonl"):
            assert set(r["alpha"]) == {alpha}


@pytest.mark.server
def test_groups_and_temperature_through_fused(fused_server, first_run, tmp_path):
    """n = 3 at T = 0.5: every (index, sample_index) once, sample 0 the same tokens as an
    n = 1 run at the same temperature, the samples of a prompt different, groups.jsonl."""
    _, prompts, _ = first_run
    single, group = tmp_path / "single", tmp_path / "group"
    run_sample(fused_server, prompts, single, "sample.temperature=0.5", "data.limit=3")
    run_sample(fused_server, prompts, group, "sample.temperature=0.5", "sample.n=3",
               "data.limit=3")
    records = list(read_records(group / "samples.jsonl"))
    assert sorted((r["index"], r["sample_index"]) for r in records) == [
        (i, s) for i in range(3) for s in range(3)]
    assert {r["temperature"] for r in records} == {0.5}
    first = {r["index"]: r["completion_token_ids"] for r in records if r["sample_index"] == 0}
    assert first == tokens_of(single)
    streams = {tuple(r["completion_token_ids"]) for r in records}
    assert len(streams) > 3  # samples of one prompt differ
    groups_file = [json.loads(line) for line in (group / "groups.jsonl").read_text().splitlines()]
    assert len(groups_file) == 3


@pytest.mark.server
def test_sigkill_then_resume_gives_the_same_dataset(fused_server, first_run, tmp_path):
    out_whole, prompts, _ = first_run
    out = tmp_path / "out"
    cmd = sample_cmd(fused_server, prompts, out, "sample.concurrency=2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    wait_for_records(proc, samples, 3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= samples.read_bytes().count(b"\n") < len(PROMPTS)
    with samples.open("ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"index": 999, "prompt": "half a li')
    run_sample(fused_server, prompts, out, "sample.concurrency=2")
    check_dataset(out, len(PROMPTS))
    assert tokens_of(out) == tokens_of(out_whole)


@pytest.mark.server
def test_sharded_submitit_local_run_unions_to_the_unsharded_dataset(fused_server, first_run,
                                                                    tmp_path):
    out, prompts, _ = first_run
    sharded = tmp_path / "sharded"
    done = subprocess.run(sample_cmd(fused_server, prompts, sharded, "hydra/launcher=local",
                                     "data.num_shards=2", "data.shard_index=0,1",
                                     f"hydra.sweep.dir={tmp_path / 'sweep'}", multirun=True),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    union = {**tokens_of(sharded / "job0"), **tokens_of(sharded / "job1")}
    assert union == tokens_of(out)


@pytest.mark.server
def test_top_k_is_refused_with_fused(fused_server, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    for overrides in (("sample.transport=fused", "sample.top_k=5"), ("sample.top_k=5",)):
        done = run_sample(fused_server, prompts, tmp_path / "o", *overrides, check=False)
        assert done.returncode == 2 and "sample.top_k" in done.stderr
        assert "full vocabulary" in done.stderr
    assert not (tmp_path / "o" / "samples.jsonl").exists()


@pytest.mark.server
def test_replica_killed_mid_run_its_prompts_finish_elsewhere(fused_server, fused_models,
                                                             first_run, tmp_path):
    out_whole, prompts, _ = first_run
    replica = Servers(run_dir=tmp_path / "vllm", models=dict(fused_models))
    replica.start_fused()
    out = tmp_path / "out"
    cmd = sample_cmd(fused_server, prompts, out, "sample.concurrency=2", "theta.max_retries=1",
                     f"theta.url=[{fused_server.url('fused')},{replica.url('fused')}]")
    run_killing_a_replica(cmd, replica, "fused", out)
    assert tokens_of(out) == tokens_of(out_whole)


# -- guards, no server ----------------------------------------------------------------------
def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_mismatched_tokenizer_is_refused_before_any_vllm_work(fused_models, tmp_path):
    other = copy_model(fused_models["theta"], tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][: len(tok["model"]["merges"]) // 2]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(FusedSetupError, match="do not share a tokenizer"):
        hf_overrides(fused_models["theta"], other)
    done = subprocess.run(["bash", str(START_SCRIPT), "--fused", "--theta",
                           str(fused_models["theta"]), "--target", str(other), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert done.returncode == 1 and "do not share a tokenizer" in done.stderr
    assert not list((tmp_path / "run").glob("*.pid"))


def changed_target(fused_models, tmp_path, change: dict) -> Path:
    other = copy_model(fused_models["target"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))
    return other


SLIDING = {"sliding_window": 64, "layer_types": ["sliding_attention"] * 2}


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 1000}, "more than padding"),
    (SLIDING, r"one KV-cache group \(theta: full; target: sliding window 64\)"),
    ({"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]},
     "target: full, sliding window 64"),
])
def test_pairs_one_engine_cannot_hold_are_refused(fused_models, tmp_path, change, message):
    with pytest.raises(FusedSetupError, match=message):
        hf_overrides(fused_models["theta"], changed_target(fused_models, tmp_path, change))


def test_pairs_that_differ_in_head_size_kv_heads_and_layers_are_accepted(fused_models, tmp_path):
    """vLLM groups full-attention layers of any shape; the top-level config describes the
    larger model (head size, KV heads, attention heads), for the buffers vLLM sizes from it."""
    change = {"head_dim": 128, "num_attention_heads": 4, "num_key_value_heads": 1,
              "num_hidden_layers": 5}
    overrides = hf_overrides(fused_models["theta"],
                             changed_target(fused_models, tmp_path, change))
    assert {k: overrides[k] for k in ("head_dim", "num_key_value_heads",
                                      "num_attention_heads")} == {
        "head_dim": 128, "num_key_value_heads": 2, "num_attention_heads": 4}


def test_padded_vocabulary_is_accepted(fused_models):
    overrides = hf_overrides(fused_models["theta"], fused_models["target"])
    assert overrides["dual_sampling_fused"]["vocab_size"] == VOCAB


def info(fused: bool, url: str = "http://a") -> ServerInfo:
    return ServerInfo(url=url, model="m", max_model_len=2048, bos_token_id=0,
                      eos_token_ids=(1,), vocab_size=VOCAB, has_plugin=True, fused=fused)


def test_transport_choice():
    assert wants_fused(SampleParams(), [info(True)])
    assert not wants_fused(SampleParams(), [info(False)])
    with pytest.raises(ServerMismatchError, match="one model"):
        wants_fused(SampleParams(transport="fused"), [info(False)])
    with pytest.raises(ServerMismatchError, match="is a fused server"):
        wants_fused(SampleParams(transport="session"), [info(True)])
    with pytest.raises(ServerMismatchError, match="mixes"):
        wants_fused(SampleParams(), [info(True), info(False, "http://b")])
    with pytest.raises(ConfigError, match="sample.top_k"):
        wants_fused(SampleParams(top_k=20), [info(True)])
    with pytest.raises(ConfigError, match="sample.top_k"):
        SampleParams(top_k=5, transport="fused").check("sample")


def test_prompt_seeds_are_distinct_and_stable():
    seeds = [prompt_seed(0, i) for i in range(1000)] + [prompt_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert prompt_seed(0, 5) == prompt_seed(0, 5)
