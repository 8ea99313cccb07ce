"""The exact reference and the tiny model pair it loads: alpha* cross-checked with scipy,
builds deterministic by seed, distributions peaked and different, sliding-window NLL."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq

from dual_sampling.models.reference import Reference
from dual_sampling.models.tiny_models import (corpus_path, ensure_tiny_models, make_tiny_models,
                                              read_marker)

TEXT = "Return the number of items in a container. The river ran slowly past the mill."


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference(ensure_tiny_models())


@pytest.fixture(scope="module")
def corpus_ids(ref) -> list[int]:
    """A few hundred tokens of the corpus, from the end (the target model's half)."""
    text = corpus_path().read_text()[-3000:]
    return ref.tokenizer(text)["input_ids"][:400]


def brentq_alpha(logp_theta: np.ndarray, logp_target: np.ndarray) -> float:
    """argmin over [0, 1] of log Z(alpha) = log sum theta^(1-alpha) target^alpha, via its derivative."""
    def d_log_z(alpha):  # E_q[logp_target - logp_theta]
        log_w = (1 - alpha) * logp_theta + alpha * logp_target
        q = np.exp(log_w - log_w.max())
        return np.sum(q * (logp_target - logp_theta)) / q.sum()

    if d_log_z(0.0) >= 0:
        return 0.0
    if d_log_z(1.0) <= 0:
        return 1.0
    return brentq(d_log_z, 0.0, 1.0, xtol=1e-14)


def test_full_vocab_alpha_matches_brentq(ref):
    ids = ref.tokenizer(TEXT)["input_ids"]
    comparison = ref.alpha_full(ids, top_k=20)
    logp_theta = ref.full_logprobs("theta", ids)
    logp_target = ref.full_logprobs("target", ids)
    expected = np.array([brentq_alpha(a, b) for a, b in zip(logp_theta, logp_target)])
    assert len(expected) == len(ids) >= 10
    np.testing.assert_allclose(comparison.alpha_full, expected, atol=1e-6, rtol=0)
    assert 0 < expected.min() and expected.max() < 1  # interior: the check is not vacuous
    np.testing.assert_allclose(np.exp(comparison.log_q_full).sum(-1), 1.0, atol=1e-12)
    last_theta, last_target = ref.position_logprobs(ids)
    np.testing.assert_array_equal(last_theta, logp_theta[-1])
    np.testing.assert_array_equal(last_target, logp_target[-1])


def test_topk_alpha_over_whole_vocab_is_full_alpha(ref):
    ids = ref.tokenizer(TEXT)["input_ids"]
    comparison = ref.alpha_full(ids, top_k=ref.vocab_size)
    assert comparison.candidates.valid.sum(-1).tolist() == [ref.vocab_size] * len(ids)
    np.testing.assert_allclose(comparison.alpha_topk, comparison.alpha_full, atol=1e-7, rtol=0)


def test_distributions_peaked_and_different(ref, corpus_ids):
    logp_theta = ref.full_logprobs("theta", corpus_ids)  # (L, V)
    logp_target = ref.full_logprobs("target", corpus_ids)
    p_theta, p_target = np.exp(logp_theta), np.exp(logp_target)
    entropy_theta = -(p_theta * logp_theta).sum(-1).mean()
    entropy_target = -(p_target * logp_target).sum(-1).mean()
    kl_theta_target = (p_theta * (logp_theta - logp_target)).sum(-1).mean()
    assert entropy_theta < 5 and entropy_target < 5, (entropy_theta, entropy_target)
    assert kl_theta_target > 0.05, kl_theta_target


def test_builds_are_deterministic_by_seed(tmp_path):
    first = make_tiny_models(tmp_path / "a", seed=7, train_steps=5)
    second = make_tiny_models(tmp_path / "b", seed=7, train_steps=5)
    for name in ("theta", "target"):
        for file in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (first[name] / file).read_bytes() == (second[name] / file).read_bytes(), file
    assert read_marker(tmp_path / "a")["stats"] == read_marker(tmp_path / "b")["stats"]

    built_at = (first["theta"] / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_models(tmp_path / "a", seed=7, train_steps=5) == first  # complete: skipped
    assert (first["theta"] / "model.safetensors").stat().st_mtime_ns == built_at


def test_tokenizer_and_configs_are_servable(ref):
    models = ensure_tiny_models()
    tokenizer = ref.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.pad_token is not None and tokenizer.unk_token is not None
    assert len(tokenizer) == ref.vocab_size == 1024
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<s>") and prompt.endswith("<|assistant|>\n")
    for name in ("theta", "target"):
        config = json.loads((models[name] / "config.json").read_text())
        generation = json.loads((models[name] / "generation_config.json").read_text())
        assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM CPU kernel
        assert generation["eos_token_id"] == tokenizer.eos_token_id
        assert generation["bos_token_id"] == tokenizer.bos_token_id


@pytest.mark.parametrize("context_length, stride", [(24, 10), (24, 24), (20, 7)])
def test_sliding_window_nll_scores_each_token_once(ref, corpus_ids, context_length, stride):
    ids = corpus_ids[:60]
    total_nll, n_scored = ref.sliding_window_nll("theta", ids, context_length, stride)
    # brute force: token t is scored by the first window that ends after it and starts before it
    expected_nll, expected_scored, begin = 0.0, 0, 0
    windows = []
    while True:
        windows.append((begin, min(begin + context_length, len(ids))))
        if windows[-1][1] == len(ids):
            break
        begin += stride
    for t in range(1, len(ids)):
        begin = next(b for b, e in windows if e > t)
        if begin < t:
            expected_nll -= ref.full_logprobs("theta", ids[begin:t])[-1][ids[t]]
            expected_scored += 1
    assert n_scored == expected_scored
    assert n_scored == (len(ids) - 1 if stride < context_length
                        else len(ids) - len(windows))
    assert total_nll == pytest.approx(expected_nll, rel=1e-6)  # float32 forwards of other lengths


def test_sliding_window_with_whole_text_in_context_is_the_plain_sum(ref, corpus_ids):
    logp = ref.full_logprobs("target", corpus_ids)  # (L, V)
    plain = -logp[np.arange(len(corpus_ids) - 1), corpus_ids[1:]].sum()
    total_nll, n_scored = ref.sliding_window_nll("target", corpus_ids, len(corpus_ids), 1)
    assert n_scored == len(corpus_ids) - 1
    assert total_nll == pytest.approx(plain, rel=1e-12)
