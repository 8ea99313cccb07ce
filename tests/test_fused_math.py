"""The fused transport's torch math against the numpy reference (dual_sampling/maths/mixture.py),
scipy and float64: alpha*, q*'s diagnostics, the token and its logprob."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from dual_sampling.maths import mixture
from dual_sampling.maths import kernels


def rows_of(a: np.ndarray, b: np.ndarray) -> kernels.Rows:
    return kernels.Rows.of(torch.as_tensor(a), torch.as_tensor(b))


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


def assert_diagnostics(solution: kernels.Solution, a: np.ndarray, b: np.ndarray,
                       atol: float) -> None:
    """The solution's log Z, KLs and entropy against numpy's at the solution's own alpha."""
    alpha = solution.alpha.numpy()
    mix = solution.mixture()
    log_q = mixture.log_mixture(a, b, alpha)
    want = mixture.token_diagnostics(a, b, log_q)
    shared = np.isfinite(a) & np.isfinite(b)
    log_z = logsumexp(np.where(shared, (1 - alpha[:, None]) * np.where(shared, a, 0)
                               + alpha[:, None] * np.where(shared, b, 0), -np.inf), axis=-1)
    np.testing.assert_allclose(mix.log_z.numpy(), log_z, atol=atol)
    for name in ("kl_q_theta", "kl_q_target", "entropy_q"):
        np.testing.assert_allclose(getattr(mix, name).numpy(), want[name], atol=atol)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 16), vocab=st.integers(2, 3000),
       scale=st.floats(0.01, 12.0), pad=st.integers(0, 3), warm=st.booleans(),
       shift=st.floats(-30.0, 30.0))
def test_alpha_and_diagnostics_match_numpy(seed, rows, vocab, scale, pad, warm, shift):
    """alpha* against mixture.py's solver, and the diagnostics from the block sums (moved to
    alpha* by Taylor's formula when the last step was not evaluated) against numpy's at
    that alpha; the logits may come unnormalised (shifted)."""
    rng = np.random.default_rng(seed)
    pad = min(pad, vocab - 1)
    a, b = random_pair(rng, rows, vocab, scale, pad)
    start = rng.uniform(size=rows) if warm else None
    solution = kernels.solve(rows_of(a + shift, b - shift), start)
    want = mixture.solve_alpha(a, b, tol=1e-12)
    shared = np.isfinite(a) & np.isfinite(b)
    q, d = np.exp(mixture.log_mixture(a, b, want)), np.where(shared, b, 0) - np.where(shared, a, 0)
    var = (q * d * d).sum(-1) - (q * d).sum(-1) ** 2
    # 1e-6, or what float64 rounding of g (~1e-16 here) allows: that over g' = Var_q[d]
    assert (np.abs(solution.alpha.numpy() - want) <= 1e-6 + 1e-15 / np.maximum(var, 1e-300)).all()
    assert solution.evaluations < kernels.MAX_ITER
    assert_diagnostics(solution, a, b, atol=1e-9)


def test_a_fixed_alpha_is_exact_and_needs_one_pass():
    rng = np.random.default_rng(5)
    a, b = random_pair(rng, 6, 2500, 3.0, pad=2)
    alpha = np.array([0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
    solution = kernels.solve(rows_of(a, b), alpha, np.ones(6, bool))
    assert solution.evaluations == 1 and (solution.alpha.numpy() == alpha).all()
    assert_diagnostics(solution, a, b, atol=1e-9)


def test_a_chebyshev_step_that_cancels_newton_is_not_taken():
    """Two ids, g(0.5) = 1.9, g' = 8, g'' = -67: the cubic term cancels the Newton step to
    7e-4, whose error estimate passed tol; an old solver stopped there at 0.4998."""
    a = np.array([[-0.06549518, -2.75834759]])
    b = np.array([[-7.44786369, -5.82854908e-04]])
    b = b - logsumexp(b, axis=-1, keepdims=True)
    solution = kernels.solve(rows_of(a, b))
    assert abs(solution.alpha.item() - chernoff_scipy(a[0], b[0])) < 1e-6


def test_alpha_matches_scipy_on_peaked_rows():
    rng = np.random.default_rng(0)
    a, b = random_pair(rng, 8, 1024, 6.0, pad=24)
    solution = kernels.solve(rows_of(a, b))
    for row in range(8):
        assert abs(solution.alpha[row].item() - chernoff_scipy(a[row], b[row])) < 1e-6
    assert solution.evaluations <= 8


def test_identical_rows_give_one_half_and_log_q_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = random_pair(rng, 4, 50, 3.0)
    b[0] = a[0]
    rows = rows_of(a, b)
    solution = kernels.solve(rows, np.array([0.2, 0.5, 0.5, 0.5]))
    assert solution.alpha[0].item() == 0.5
    mix = solution.mixture()
    np.testing.assert_allclose(rows.log_q(solution.alpha, mix.log_z).numpy(),
                               mixture.log_mixture(a, b, solution.alpha.numpy()), atol=1e-10)
    # at alpha* (interior) the two KLs are equal
    np.testing.assert_allclose(mix.kl_q_theta[1:], mix.kl_q_target[1:], atol=1e-6)


@pytest.mark.parametrize("vocab", [5, 1024, 3000, 4096 + 17])
def test_tokens_match_numpy_inverse_cdf_at_every_temperature(vocab):
    """Two-level inverse CDF (block masses, then one block's weights) against a cumulative
    sum over the whole row; rows with whole blocks off the support; T = 1, 0.5, 2, 0."""
    rng = np.random.default_rng(vocab)
    a, b = random_pair(rng, 32, vocab, 3.0, pad=min(3, vocab - 1))
    if vocab > 100:
        a[:4, : vocab // 2] = -np.inf  # whole blocks of zeros
        a[:4] -= logsumexp(a[:4], axis=-1, keepdims=True)
    rows = rows_of(a, b)
    solution = kernels.solve(rows)
    alpha = solution.alpha.numpy()
    u = np.concatenate([rng.uniform(size=30), [0.0, 1 - 2**-53]])
    temperature = np.array([1.0, 0.5, 2.0, 0.0] * 8)
    draw = kernels.sample(rows, solution, solution.mixture().log_z, torch.as_tensor(u),
                          torch.as_tensor(temperature))
    log_q = mixture.log_mixture(a, b, alpha)
    for t in (1.0, 0.5, 2.0):
        pick = temperature == t
        log_qt = log_q[pick] / t - logsumexp(log_q[pick] / t, axis=-1, keepdims=True)
        want = mixture.inverse_cdf(log_qt, u[pick])
        np.testing.assert_array_equal(draw.token.numpy()[pick], want)
        np.testing.assert_allclose(draw.logp_q.numpy()[pick],
                                   log_qt[np.arange(len(want)), want], atol=1e-9)
    greedy = temperature == 0
    np.testing.assert_array_equal(draw.token.numpy()[greedy], log_q[greedy].argmax(-1))
    assert (draw.logp_q.numpy()[greedy] == 0).all()
    assert np.isfinite(log_q[np.arange(32), draw.token.numpy()]).all()


def test_uniforms_depend_on_seed_and_step_only():
    seeds = np.array([1, 2, 1, 7], dtype=np.uint64)
    steps = np.array([0, 0, 5, 3])
    u = kernels.uniforms(seeds, steps)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 4
    np.testing.assert_array_equal(kernels.uniforms(seeds[2:3], steps[2:3]), u[2:3])
    many = kernels.uniforms(np.full(20000, 3, np.uint64), np.arange(20000))
    assert abs(many.mean() - 0.5) < 0.01


# -- float32 logits at a real vocabulary (issue 17) ---------------------------------------------
def test_float32_logits_at_a_real_vocabulary_match_float64():
    """V = 151,936 float32 logits, unnormalised, LM-like tails: alpha*, log Z, the KLs, the
    entropy and the tokens of the compiled float32 kernels against the same math in float64
    (itself the root of g = E_q[d] to 1e-9), and the compiled kernels against eager ones."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 151936, generator=generator) * 3 + 7
    target = theta + torch.randn(4, 151936, generator=generator) * 1.5 - 3
    rows = kernels.Rows.of(theta, target)
    solution = kernels.solve(rows, np.full(4, 0.2))
    exact_rows = kernels.Rows.of(theta.double(), target.double())
    exact = kernels.solve(exact_rows, tol=1e-12)
    a64 = theta.double().log_softmax(-1).numpy()
    b64 = target.double().log_softmax(-1).numpy()
    x = exact.alpha.numpy()[:, None]
    q = np.exp(mixture.log_mixture(a64, b64, x[:, 0]))
    d = b64 - a64
    assert (np.abs((q * d).sum(-1)) <= 1e-9 * ((q * d * d).sum(-1))).all()
    np.testing.assert_allclose(solution.alpha.numpy(), x[:, 0], atol=1e-6)
    mix, exact_mix = solution.mixture(), exact.mixture()
    for name in ("log_z", "kl_q_theta", "kl_q_target", "entropy_q"):
        np.testing.assert_allclose(getattr(mix, name).numpy(), getattr(exact_mix, name).numpy(),
                                   atol=1e-6)
    u = torch.as_tensor(np.random.default_rng(0).uniform(size=4))
    ones = torch.ones(4, dtype=torch.float64)
    token = kernels.sample(rows, solution, mix.log_z, u, ones).token
    assert (token == kernels.sample(exact_rows, exact, exact_mix.log_z, u, ones).token).all()
    # the compiled kernel and the same function run eagerly
    alpha = torch.full((4,), 0.3)
    compiled = rows.moment_blocks(alpha)
    eager = kernels._over_blocks(kernels._MOMENT_BLOCKS.fn, theta, target, rows.c_theta,
                                 rows.c_target, alpha)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_chunked_and_indexed_evaluations_equal_one_call(monkeypatch):
    """Kernel calls split into chunks of rows, and evaluations of a subset of rows (by index,
    as the solver does once most rows have converged), give the same block sums as one
    call over the whole batch, and so the same alpha*, diagnostics and tokens (to rounding:
    after many shapes dynamo may run a kernel eagerly, which sums in another order)."""
    a, b = random_pair(np.random.default_rng(3), 7, 2500, 3.0, pad=2)
    rows = rows_of(a, b)
    alpha = torch.linspace(0.1, 0.9, 7, dtype=torch.float64)
    whole = rows.moment_blocks(alpha)
    solution = kernels.solve(rows)
    u = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    ones = torch.ones(7, dtype=torch.float64)
    token = kernels.sample(rows, solution, solution.mixture().log_z, u, ones).token
    monkeypatch.setattr(kernels, "CHUNK", 2 * 2500)  # two rows a call
    torch.testing.assert_close(rows.moment_blocks(alpha), whole, rtol=1e-12, atol=1e-300)
    index = torch.tensor([5, 0, 3])
    torch.testing.assert_close(rows.moment_blocks(alpha[index], index), whole[index],
                               rtol=1e-12, atol=1e-300)
    chunked = kernels.solve(rows)
    torch.testing.assert_close(chunked.alpha, solution.alpha, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(chunked.blocks, solution.blocks, rtol=1e-12, atol=1e-300)
    assert (kernels.sample(rows, chunked, chunked.mixture().log_z, u, ones).token
            == token).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 3000), scale=st.floats(0.05, 8.0))
def test_every_alpha_rule_matches_numpy_over_the_full_vocabulary(seed, vocab, scale):
    """kernels.solve_rules (torch, what the fused engine and the exact session path run)
    against mixture.choose_alpha (numpy, itself checked against scipy in test_mixture.py),
    one row per rule and clamp; float64 logprobs, so to the solvers' tolerances."""
    rng = np.random.default_rng(seed)
    methods = ["kl_symmetry", "ess_balance", "entropy", "fixed", "kl_symmetry", "ess_balance"]
    alpha = np.array([np.nan, np.nan, np.nan, 0.3, np.nan, np.nan])
    lo = np.array([0.0, 0.0, 0.2, 0.0, 0.45, 0.5])
    hi = np.array([1.0, 1.0, 0.6, 1.0, 0.55, 1.0])
    a, b = random_pair(rng, len(methods), vocab, scale)
    solution = kernels.solve_rules(rows_of(a, b), methods, alpha, lo, hi)
    want = [mixture.choose_alpha(a[i], b[i], m, None if m != "fixed" else alpha[i], lo[i],
                                 hi[i]) for i, m in enumerate(methods)]
    np.testing.assert_allclose(solution.alpha.numpy(), want, atol=1e-6)
    assert_diagnostics(solution, a, b, atol=1e-6)
