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


def test_a_chebyshev_step_that_cancels_newton_is_not_taken():
    """Two ids, g(0.5) = 1.9, g' = 8, g'' = -67: the cubic term cancels the Newton step to
    7e-4, whose error estimate passed tol; the old solver stopped there at 0.4998."""
    a = np.array([[-0.06549518, -2.75834759]])
    b = np.array([[-7.44786369, -5.82854908e-04]])
    b = b - logsumexp(b, axis=-1, keepdims=True)
    alpha, _ = fused_math.solve_alpha(rows_of(a, b))
    assert abs(alpha.item() - chernoff_scipy(a[0], b[0])) < 1e-6


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


# -- the pruned support and float32 rows (issue 17) ---------------------------------------------
def peaked_pair(rng: np.random.Generator, rows: int, vocab: int, scale: float):
    """Rows whose logprobs span far more than PRUNE_NATS: most ids can be pruned."""
    theta = rng.standard_t(3, size=(rows, vocab)) * scale
    target = theta + rng.normal(size=(rows, vocab)) * scale / 3
    return (theta - logsumexp(theta, axis=-1, keepdims=True),
            target - logsumexp(target, axis=-1, keepdims=True))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 8), vocab=st.integers(50, 3000),
       scale=st.floats(8.0, 30.0))
def test_pruned_support_gives_the_full_vocabulary_alpha_and_diagnostics(seed, rows, vocab,
                                                                         scale):
    """Dropping ids with both logprobs below L - PRUNE_NATS changes alpha* and the
    diagnostics by less than 1e-9, and the mass dropped is below the stated bound at
    alpha = 0, alpha* and 1."""
    rng = np.random.default_rng(seed)
    a, b = peaked_pair(rng, rows, vocab, scale)
    pruned = rows_of(a, b)
    alpha, _ = fused_math.solve_alpha(pruned, tol=1e-12)
    want = mixture.solve_alpha(a, b, tol=1e-13)
    q, d = np.exp(mixture.log_mixture(a, b, want)), b - a
    var = (q * d * d).sum(-1) - (q * d).sum(-1) ** 2
    sharp = var > 1e-8  # elsewhere log Z is flat to rounding and any alpha is a minimiser
    # 1e-9, or what float64 rounding of g (~1e-13 here) allows: that over g' = Var_q[d]
    assert (np.abs(alpha.numpy() - want)[sharp] <= 1e-9 + 1e-13 / var[sharp]).all()

    def log_z(x):
        return logsumexp((1 - x[:, None]) * a + x[:, None] * b, axis=-1)

    assert (log_z(alpha.numpy()) <= log_z(want) + 1e-12).all()
    alpha = torch.where(torch.as_tensor(sharp), alpha, torch.as_tensor(want))
    mix = fused_math.Mixture.at(pruned, alpha)
    log_q = mixture.log_mixture(a, b, want)
    diag = mixture.token_diagnostics(a, b, log_q)
    for name in ("kl_q_theta", "kl_q_target", "entropy_q"):
        np.testing.assert_allclose(getattr(mix, name).numpy(), diag[name], atol=1e-9)
    kept = np.zeros_like(a, dtype=bool)
    if pruned.columns is None:
        kept[:] = True
    else:
        for row in range(rows):
            kept[row, pruned.columns[row].numpy()[np.isfinite(pruned.a[row].numpy())]] = True
    for x in (np.zeros(rows), want, np.ones(rows)):
        log_w = (1 - x[:, None]) * a + x[:, None] * b
        share = np.exp(logsumexp(np.where(kept, -np.inf, log_w), axis=-1)
                       - logsumexp(log_w, axis=-1))
        assert (share <= fused_math.neglected_mass_bound(vocab)).all()


def test_peaked_rows_are_pruned_and_sampled_like_the_full_rows():
    rng = np.random.default_rng(3)
    a, b = peaked_pair(rng, 16, 4000, 25.0)
    rows = rows_of(a, b)
    assert rows.columns is not None and rows.a.shape[1] <= 4000 * fused_math.COMPACT_SHARE
    alpha, _ = fused_math.solve_alpha(rows)
    mix = fused_math.Mixture.at(rows, alpha)
    u = rng.uniform(size=16)
    token = rows.token(fused_math.inverse_cdf(mix.weights, torch.as_tensor(u))).numpy()
    np.testing.assert_array_equal(token, mixture.inverse_cdf(
        mixture.log_mixture(a, b, alpha.numpy()), u))
    full = rows.scatter(mix.log_q(rows, alpha), 4000).numpy()
    np.testing.assert_allclose(full[np.isfinite(full)],
                               mixture.log_mixture(a, b, alpha.numpy())[np.isfinite(full)],
                               atol=1e-10)


def test_float32_rows_at_a_real_vocabulary_stay_float32_and_exact():
    """V = 151,936, LM-like tails (nothing prunable): the rows stay float32 (no float64
    copy) and alpha*, log Z and the KLs match the float64 solve to 1e-6, itself the root
    of g = E_q[d] to 1e-9."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 151936, generator=generator) * 3
    target = theta + torch.randn(4, 151936, generator=generator) * 1.5
    a, b = theta.log_softmax(-1), target.log_softmax(-1)
    rows = fused_math.Rows.of(a, b)
    assert rows.a.dtype == torch.float32 and rows.d.dtype == torch.float32
    alpha, _ = fused_math.solve_alpha(rows)
    exact_rows = fused_math.Rows.of(a.double(), b.double())
    exact, _ = fused_math.solve_alpha(exact_rows, tol=1e-12)
    x, a64, b64 = exact.numpy()[:, None], a.double().numpy(), b.double().numpy()
    log_q = (1 - x) * a64 + x * b64
    q = np.exp(log_q - logsumexp(log_q, axis=-1, keepdims=True))
    d = b64 - a64
    assert (np.abs((q * d).sum(-1)) <= 1e-9 * ((q * d * d).sum(-1))).all()
    np.testing.assert_allclose(alpha.numpy(), exact.numpy(), atol=1e-6)
    mix = fused_math.Mixture.at(rows, alpha)
    exact_mix = fused_math.Mixture.at(exact_rows, alpha)
    for name in ("log_z", "kl_q_theta", "kl_q_target"):
        np.testing.assert_allclose(getattr(mix, name).numpy(), getattr(exact_mix, name).numpy(),
                                   atol=1e-6)


@pytest.mark.parametrize("vocab", [5, 1024, 3000, 4096 + 17])
def test_blocked_inverse_cdf_matches_numpy(vocab):
    rng = np.random.default_rng(vocab)
    a, _ = random_pair(rng, 32, vocab, 3.0, pad=min(3, vocab - 1))
    if vocab > 100:
        a[:4, : vocab // 2] = -np.inf  # whole blocks of zeros
    u = np.concatenate([rng.uniform(size=30), [0.0, 1 - 2**-53]])
    got = fused_math.inverse_cdf(torch.as_tensor(np.exp(a)), torch.as_tensor(u)).numpy()
    np.testing.assert_array_equal(got, mixture.inverse_cdf(a, u))
    assert np.isfinite(a[np.arange(32), got]).all()


def test_padded_suffix_is_dropped_without_copies():
    rng = np.random.default_rng(4)
    a, b = random_pair(rng, 3, 300, 2.0, pad=20)
    rows = rows_of(a, b)
    assert rows.a.shape[1] == 280 and rows.everywhere
    alpha, _ = fused_math.solve_alpha(rows)
    np.testing.assert_allclose(alpha.numpy(), mixture.solve_alpha(a, b, tol=1e-12), atol=1e-7)
    log_q = rows.scatter(fused_math.Mixture.at(rows, alpha).log_q(rows, alpha), 300).numpy()
    assert np.isneginf(log_q[:, 280:]).all()
