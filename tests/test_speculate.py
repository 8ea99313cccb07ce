"""Speculative sampling's verify step (fused/verify.py) against closed forms, no server.

Every row of a batch is the same (theta, target) pair, so each emitted token, at any
position of any request, must be an independent draw from q = q*^(1/T) normalised, with q*
from scipy's Chernoff point (or the fixed alpha); the acceptance rate must be
1 - TV(p, q) with p the draft's theta^(1/T). Counts are tested with chi-square and a
binomial bound; diagnostics against mixture.py's numpy reference. The end-to-end twin
against a real engine and transformers is tests/test_speculative.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax
from scipy.stats import chisquare

from dual_sampling.maths import mixture
from dual_sampling.vllm_plugin.fused import verify
from helpers import chernoff_alpha, chi_square_p

V = 48
K = 3
N = 6000  # requests: N first tokens, and about N * acceptance second ones


def pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    theta = 2.0 * rng.standard_normal(V)
    return theta, 0.4 * theta + 1.5 * rng.standard_normal(V)


def run(theta: np.ndarray, target: np.ndarray, temperature: float, alpha, drafts: int = K,
        n: int = N, given: bool = True, **limits):
    """One verify step over n requests with `drafts` drafts each, drawn from p (limits:
    top_k, top_p, min_p of every request)."""
    a = log_softmax(theta)
    p = np.exp(log_softmax(a / temperature)) if temperature > 0 else None
    rng = np.random.default_rng(1)
    if p is not None:
        ids = rng.choice(V, size=n * drafts, p=p)
    else:
        ids = np.full(n * drafts, int(np.argmax(a)))
    requests = [verify.Request(f"r{i}", 1000 + i, alpha, temperature, 5, drafts, **limits)
                for i in range(n)]
    rows = n * (drafts + 1)
    t = torch.tensor(np.tile(theta, (rows, 1)), dtype=torch.float32)
    g = torch.tensor(np.tile(target, (rows, 1)), dtype=torch.float32)
    probs = None if p is None or not given else torch.tensor(np.tile(p, (n * drafts, 1)))
    return verify.verify(t, g, requests, torch.tensor(ids), probs), p


@pytest.mark.parametrize("temperature,alpha", [(1.0, None), (0.7, None), (1.0, 0.3),
                                               (0.7, 0.8)])
def test_emitted_tokens_are_draws_from_q(temperature, alpha):
    theta, target = pair(0)
    (step, columns), p = run(theta, target, temperature, alpha)
    a, b = log_softmax(theta), log_softmax(target)
    x = chernoff_alpha(a, b) if alpha is None else alpha
    log_q = log_softmax(mixture.log_mixture(a, b, x) / temperature)
    q = np.exp(log_q)
    first = np.array([ts[0] for ts in step.tokens])
    second = np.array([ts[1] for ts in step.tokens if len(ts) > 1])
    assert chi_square_p(first, q) > 1e-3
    assert len(second) > N / 4 and chi_square_p(second, q) > 1e-3
    # acceptance of a draft drawn from p: sum_x min(p, q) = 1 - TV(p, q)
    rate = 1.0 - 0.5 * np.abs(p - q).sum()
    first_accepted = np.mean([len(ts) > 1 for ts in step.tokens])
    assert abs(first_accepted - rate) < 5 * np.sqrt(rate * (1 - rate) / N)
    assert step.proposed == N * K and step.accepted == sum(len(ts) - 1 for ts in step.tokens)
    # diagnostics of every emitted token: the reference's, at that token
    diag = mixture.token_diagnostics(a, b, mixture.log_mixture(a, b, x))
    tokens = np.array(columns["token"])
    np.testing.assert_allclose(columns["alpha"], x, atol=1e-6)
    np.testing.assert_allclose(columns["logp_theta"], a[tokens], atol=1e-5)
    np.testing.assert_allclose(columns["logp_target"], b[tokens], atol=1e-5)
    np.testing.assert_allclose(columns["logp_q"], log_q[tokens], atol=1e-5)
    for name in ("kl_q_theta", "kl_q_target", "entropy_q"):
        np.testing.assert_allclose(columns[name], diag[name], atol=1e-5)



@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_drafts_p_from_thetas_logits_is_the_one_vllm_hands_over(temperature):
    """Without vLLM's draft probabilities the verify step takes p from theta's logits at the
    verified rows (at T = 1 a gather and the solve's normaliser): the same acceptances and
    residuals, so the same tokens (a uniform within float rounding of a boundary could
    differ: expected count ~1e-4 here)."""
    theta, target = pair(2)
    (given, _), _ = run(theta, target, temperature, None, n=1500)
    (recomputed, _), _ = run(theta, target, temperature, None, n=1500, given=False)
    assert given.tokens == recomputed.tokens
    assert given.accepted == recomputed.accepted > 0


def test_truncate_keeps_what_vllms_sampler_keeps():
    """The support of vLLM's own top-k/top-p mask (apply_top_k_top_p_pytorch), same rows."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    rng = np.random.default_rng(3)
    rows = 40
    log_q = torch.log_softmax(torch.tensor(2.0 * rng.standard_normal((rows, V))), dim=-1)
    top_k = torch.tensor(rng.choice([0, 1, 5, 20, V], rows))
    top_p = torch.tensor(rng.choice([1.0, 0.3, 0.9], rows))
    got = verify.truncate(log_q, top_k, top_p)
    want = apply_top_k_top_p_pytorch(log_q.clone(), top_k.masked_fill(top_k <= 0, V), top_p,
                                     allow_cpu_sync=True)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    np.testing.assert_allclose(got.exp().sum(dim=-1), 1.0, atol=1e-9)
    plain = ((top_k <= 0) | (top_k >= V)) & (top_p >= 1)
    assert plain.any() and torch.equal(got[plain], log_q[plain])


def test_a_truncated_q_is_sampled_exactly():
    """Speculative sampling is exact for any target: q restricted by top_k and top_p."""
    theta, target = pair(0)
    (step, _), _ = run(theta, target, 1.0, None, top_k=8, top_p=0.8)
    a, b = log_softmax(theta), log_softmax(target)
    log_q = torch.tensor(log_softmax(mixture.log_mixture(a, b, chernoff_alpha(a, b))))[None]
    q = verify.truncate(log_q, torch.tensor([8]), torch.tensor([0.8]))[0].exp().numpy()
    first = np.array([ts[0] for ts in step.tokens])
    second = np.array([ts[1] for ts in step.tokens if len(ts) > 1])
    support = np.flatnonzero(q > 0)
    assert 1 < len(support) < 8 and set(first) | set(second) <= set(support)
    for tokens in (first, second):  # over the support only: every bin is large
        counts = np.bincount(tokens, minlength=V)[support]
        assert chisquare(counts, q[support] * counts.sum()).pvalue > 1e-3

def test_temperature_zero_emits_the_argmax_of_q_star():
    theta, target = pair(3)
    a, b = log_softmax(theta), log_softmax(target)
    best = int(np.argmax(mixture.log_mixture(a, b, chernoff_alpha(a, b))))
    (step, columns), _ = run(theta, target, 0.0, None, n=4)
    # the drafts are theta's argmax: accepted only where it is q*'s
    expected = [best] * (K + 1) if best == int(np.argmax(a)) else [best]
    assert all(ts == expected for ts in step.tokens)
    assert set(columns["logp_q"]) == {0.0}


def test_a_request_without_drafts_draws_like_the_non_speculative_engine():
    """K = 0 rows (the first token after a prompt) use stream 0 at their position: the
    uniform the non-speculative sampler uses, so the token is q's inverse CDF there."""
    from dual_sampling.maths import kernels
    theta, target = pair(5)
    (step, _), _ = run(theta, target, 1.0, None, drafts=0, n=50)
    a, b = log_softmax(theta), log_softmax(target)
    cdf = np.cumsum(np.exp(mixture.log_mixture(a, b, chernoff_alpha(a, b))))
    u = kernels.uniforms(np.arange(1000, 1050, dtype=np.uint64), np.full(50, 5, np.uint64))
    expected = np.searchsorted(cdf / cdf[-1], u, side="right")
    assert [ts[0] for ts in step.tokens] == expected.tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    theta, target = pair(7)
    (whole, _), _ = run(theta, target, 1.0, None, n=40)
    (part, _), _ = run(theta, target, 1.0, None, n=10)
    assert whole.tokens[:10] == part.tokens


def test_the_speculative_server_arguments_and_bad_values(fused_models):
    import json

    from dual_sampling.vllm_plugin.fused.setup import FusedSetupError, SAMPLER, server_args
    plain = server_args(fused_models["theta"], fused_models["target"])
    assert SAMPLER in plain and "--speculative-config" not in plain
    args = server_args(fused_models["theta"], fused_models["target"], speculate="4:8")
    config = json.loads(args[args.index("--speculative-config") + 1])
    assert config["model"] == str(fused_models["theta"].resolve())
    assert config["num_speculative_tokens"] == 4
    assert config["draft_sample_method"] == "probabilistic"
    assert config["num_speculative_tokens_per_batch_size"][0] == [1, 8, 4]
    assert SAMPLER not in args and "--no-async-scheduling" in args
    for bad in ("x", "-1", "4:0", "4:8:2"):
        with pytest.raises(FusedSetupError, match="--speculate"):
            server_args(fused_models["theta"], fused_models["target"], speculate=bad)
