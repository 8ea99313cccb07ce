"""The fused engine's speculative mode (start_vllm.sh --fused --speculate K) on a real vLLM
CPU server, against transformers and scipy (the closed-form twin: tests/test_speculate.py).

Tokens 2 and 3 of a completion are drafted by theta and verified (the first comes from the
prompt's own step, before any draft), so the chi-square tests look at the token after a
fixed prefix that ends in a sampled token: many seeds, the most common first token, and the
distribution of the second among those completions against q* computed by transformers.
"""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from scipy.special import log_softmax

from dual_sampling.maths import mixture
from dual_sampling.serving.launch import Servers
from dual_sampling.wire.fused_format import COUNTERS_PATH, ENGINE_PATH
from helpers import (PROMPTS, assert_batch_invariant_and_greedy_is_the_argmax, assert_rule_alpha,
                     check_dataset, chernoff_alpha, chi_square_p, encode, generate, run_sample,
                     tokens_of, write_prompts)

K = 3  # conftest.py's spec_server
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference(fused_models):
    from dual_sampling.models.reference import Reference
    return Reference(fused_models)


def get(server: Servers, path: str) -> dict:
    with urllib.request.urlopen(server.url("fused") + path, timeout=60) as reply:
        return json.loads(reply.read())


def expected_log_q(a: np.ndarray, b: np.ndarray, alpha, temperature: float):
    """(alpha, log of q*^(1/T) normalised) from transformers' logprobs a, b at one position."""
    x = chernoff_alpha(a, b) if alpha is None else alpha
    return x, log_softmax(mixture.log_mixture(a, b, x) / temperature)


@pytest.mark.parametrize("temperature,alpha", [(1.0, None), (0.7, None), (1.0, 0.3)])
def test_drafted_tokens_follow_q_star(spec_server, reference, temperature, alpha):
    prompt = encode(reference, "The module")
    n = 2400
    results = generate(spec_server, [prompt] * n, list(range(n)), max_tokens=3,
                       temperature=temperature, alpha=alpha)
    first = np.array([r["token_ids"][0] for r in results])
    _, log_q = expected_log_q(*reference.position_logprobs(prompt), alpha, temperature)
    assert chi_square_p(first, np.exp(log_q)) > 1e-3
    mode = int(np.bincount(first).argmax())
    second = [r["token_ids"][1] for r in results if r["token_ids"][0] == mode]
    assert len(second) >= 300
    _, log_q = expected_log_q(*reference.position_logprobs(prompt + [mode]), alpha, temperature)
    assert max(second) < reference.vocab_size
    assert chi_square_p(second, np.exp(log_q)) > 1e-3
    counters = get(spec_server, COUNTERS_PATH)
    assert 0.0 < counters["accepted"] < counters["proposed"]


@pytest.mark.parametrize("temperature,alpha", [(1.0, None), (0.7, 0.3)])
def test_every_emitted_token_has_the_references_diagnostics(spec_server, reference,
                                                            temperature, alpha):
    """alpha within 1e-5 of scipy's Chernoff point (or within 2e-6 / Var_q[d]: the engine's
    float32 logprobs differ from transformers' by ~1e-6, test_fused.py derives it); the
    logprobs, KLs and entropy within 1e-3 (that alpha error times |d| <= ~10 here)."""
    prompts = [encode(reference, p) for p in PROMPTS[:3]]
    results = generate(spec_server, prompts, [21, 22, 23], max_tokens=16,
                       temperature=temperature, alpha=alpha)
    checked = 0
    for prompt, result in zip(prompts, results):
        ids = prompt + result["token_ids"]
        full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t, token in enumerate(result["token_ids"]):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            x, log_q = expected_log_q(a, b, alpha, temperature)
            q1 = np.exp(mixture.log_mixture(a, b, x))
            d = b - a
            var = q1 @ (d * d) - (q1 @ d) ** 2
            assert abs(result["alpha"][t] - x) <= max(1e-5, 2e-6 / var)
            diag = mixture.token_diagnostics(a, b, mixture.log_mixture(a, b, x))
            np.testing.assert_allclose(
                [result[f][t] for f in ("logp_theta", "logp_target", "logp_q", "kl_q_theta",
                                        "kl_q_target", "entropy_q")],
                [a[token], b[token], log_q[token], diag["kl_q_theta"], diag["kl_q_target"],
                 diag["entropy_q"]], atol=1e-3)
            checked += 1
    assert checked == 48


@pytest.mark.parametrize("rule", [{"alpha_method": "ess_balance"},
                                  {"alpha_method": "entropy", "alpha_min": 0.5,
                                   "alpha_max": 0.9}])
def test_alpha_rules_in_the_verify_step(spec_server, reference, rule):
    """The alpha rules of issue 36 through the verify step: every emitted token's alpha
    (drafted ones included) against mixture.choose_alpha on transformers' logprobs
    (helpers.assert_rule_alpha), and its logp_q under q at that alpha within 1e-3 (as
    above)."""
    prompts = [encode(reference, p) for p in PROMPTS[:2]]
    results = generate(spec_server, prompts, [31, 32], max_tokens=12, **rule)
    for prompt, result in zip(prompts, results):
        ids = prompt + result["token_ids"]
        full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t, token in enumerate(result["token_ids"]):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            got = result["alpha"][t]
            assert_rule_alpha(got, a, b, rule)
            assert abs(result["logp_q"][t] - mixture.log_mixture(a, b, got)[token]) < 1e-3


def test_same_seed_same_tokens_whatever_the_batch_and_greedy_is_the_argmax(spec_server,
                                                                           reference):
    assert_batch_invariant_and_greedy_is_the_argmax(
        spec_server, reference, [encode(reference, p) for p in PROMPTS[:12]], greedy_tokens=10)


def test_a_prompt_prefilled_in_chunks_and_a_stock_request(spec_server, reference):
    long_prompt = (encode(reference, " ".join(PROMPTS)) * 3)[:1200]  # > 512: in chunks
    result = generate(spec_server, [long_prompt], [5], max_tokens=8)[0]
    assert len(result["token_ids"]) == 8 and len(result["alpha"]) == 8
    body = json.dumps({"model": "fused", "prompt": [0, 51, 85], "max_tokens": 6, "seed": 3})
    request = urllib.request.Request(spec_server.url("fused") + "/v1/completions",
                                     body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["choices"][0]["text"]
    assert get(spec_server, ENGINE_PATH)["speculate"] == K
    assert get(spec_server, COUNTERS_PATH)["open_records"] == 0  # every record was popped


def test_sample_mode_runs_unchanged_on_a_speculative_server(spec_server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:6])
    out = tmp_path / "out"
    run_sample(spec_server, prompts, out, "sample.temperature=0.7")
    check_dataset(out, 6, exact=True)
    again = tmp_path / "again"
    run_sample(spec_server, prompts, again, "sample.temperature=0.7")
    assert tokens_of(again) == tokens_of(out)
