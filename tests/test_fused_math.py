"""The fused transport's torch math against the numpy reference (dual_sampling/mixture.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from dual_sampling import mixture
from dual_sampling.vllm_plugin import fused_math


def rows_of(a: np.ndarray, b: np.ndarray) -> fused_math.Rows:
    return fused_math.Rows.of(torch.as_tensor(a), torch.as_tensor(b))


def random_pair(rng: np.random.Generator, rows: int, vocab: int, scale: float, pad: int = 0):
    logits = rng.normal(size=(2, rows, vocab)) * scale
    logits[:, :, vocab - pad:] = -np.inf
    logp = logits - logsumexp(logits, axis=-1, keepdims=True)
    return logp[0], logp[1]


def chernoff_scipy(a: np.ndarray, b: np.ndarray) -> float:
    finite = np.isfinite(a)
    res = minimize_scalar(lambda x: logsumexp((1 - x) * a[finite] + x * b[finite]),
                          bounds=(0, 1), method="bounded", options={"xatol": 1e-12})
    return res.x


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 16), vocab=st.integers(2, 300),
       scale=st.floats(0.01, 12.0), pad=st.integers(0, 3), warm=st.booleans())
def test_alpha_matches_numpy_solver(seed, rows, vocab, scale, pad, warm):
    rng = np.random.default_rng(seed)
    pad = min(pad, vocab - 1)
    a, b = random_pair(rng, rows, vocab, scale, pad)
    start = rng.uniform(size=rows) if warm else None
    alpha, iters = fused_math.solve_alpha(rows_of(a, b), start)
    want = mixture.solve_alpha(a, b, tol=1e-12)
    np.testing.assert_allclose(alpha.numpy(), want, atol=1e-6)
    assert iters < fused_math.MAX_ITER


def test_alpha_matches_scipy_on_peaked_rows():
    rng = np.random.default_rng(0)
    a, b = random_pair(rng, 8, 1024, 6.0, pad=24)
    alpha, iters = fused_math.solve_alpha(rows_of(a, b))
    for row in range(8):
        assert abs(alpha[row].item() - chernoff_scipy(a[row], b[row])) < 1e-6
    assert iters <= 8


def test_identical_rows_give_one_half_and_mixture_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = random_pair(rng, 4, 50, 3.0)
    b[0] = a[0]
    rows = rows_of(a, b)
    alpha, _ = fused_math.solve_alpha(rows)
    assert alpha[0].item() == 0.5
    mix = fused_math.Mixture.at(rows, alpha)
    log_q = mix.log_q(rows, alpha)
    np.testing.assert_allclose(log_q.numpy(), mixture.log_mixture(a, b, alpha.numpy()),
                               atol=1e-10)
    np.testing.assert_allclose(mix.weights.numpy(), np.exp(log_q.numpy()) *
                               np.exp(mix.log_z.numpy())[:, None], atol=1e-12)
    want = mixture.token_diagnostics(a, b, log_q.numpy())
    for name in ("kl_q_theta", "kl_q_target", "entropy_q"):
        np.testing.assert_allclose(getattr(mix, name).numpy(), want[name], atol=1e-10)
    # at alpha* (interior) the two KLs are equal
    np.testing.assert_allclose(mix.kl_q_theta[1:], mix.kl_q_target[1:], atol=1e-6)


def test_inverse_cdf_and_tempering_match_numpy():
    rng = np.random.default_rng(2)
    a, _ = random_pair(rng, 64, 40, 2.0, pad=5)
    u = rng.uniform(size=64)
    got = fused_math.inverse_cdf(torch.as_tensor(np.exp(a)), torch.as_tensor(u)).numpy()
    np.testing.assert_array_equal(got, mixture.inverse_cdf(a, u))
    assert np.isfinite(a[np.arange(64), got]).all()
    temps = torch.tensor([1.0, 0.5, 0.0, 2.0]).repeat(16)
    log_qt = fused_math.tempered(torch.as_tensor(a), temps).numpy()
    np.testing.assert_allclose(logsumexp(log_qt, axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(log_qt[1], a[1] * 2 - logsumexp(a[1] * 2), atol=1e-12)
    assert log_qt[2, a[2].argmax()] == 0.0


def test_uniforms_depend_on_seed_and_step_only():
    seeds = np.array([1, 2, 1, 7], dtype=np.uint64)
    steps = np.array([0, 0, 5, 3])
    u = fused_math.uniforms(seeds, steps)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 4
    np.testing.assert_array_equal(fused_math.uniforms(seeds[2:3], steps[2:3]), u[2:3])
    many = fused_math.uniforms(np.full(20000, 3, np.uint64), np.arange(20000))
    assert abs(many.mean() - 0.5) < 0.01
