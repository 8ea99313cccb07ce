"""dual_sampling.maths.mixture against independent references: scipy root finding on the derivative
of log Z, a dict-based top-k merge, direct formulas, and sampling frequencies."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import brentq
from scipy.special import logsumexp, softmax
from scipy.stats import chisquare

from dual_sampling.maths.mixture import (
    MISSING_POLICIES, effective_sample_size, ess_fraction, inverse_cdf, log_importance_weights,
    log_mixture, log_partition, merge_topk, normalised_weights, sample, solve_alpha, temper,
    token_diagnostics, topk_coverage)

NEG_INF = -np.inf
FINITE = st.floats(-30.0, 5.0)
ENTRY = st.one_of(FINITE, FINITE, FINITE, st.just(NEG_INF))  # -inf about one entry in four
SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def pairs(draw, with_inf=True, min_k=1, max_k=12):
    """One row of (logp_theta, logp_target), unnormalised, shape (K,)."""
    k = draw(st.integers(min_k, max_k))
    elements = ENTRY if with_inf else FINITE
    return (draw(hnp.arrays(np.float64, k, elements=elements)),
            draw(hnp.arrays(np.float64, k, elements=elements)))


def ref_normalise(logp):
    return logp - logsumexp(logp) if np.isfinite(logp).any() else logp


def ref_derivative(logp_theta, logp_target, alpha):
    """(E_q[d], E_q[d^2]), d = b - a on the shared support, each model normalised over its own
    support: E_q[d] = (log Z)'(alpha), and E_q[d^2] = (log Z)'' at a root."""
    a, b = ref_normalise(logp_theta), ref_normalise(logp_target)
    shared = np.isfinite(a) & np.isfinite(b)
    log_w = (1 - alpha) * a[shared] + alpha * b[shared]
    q = np.exp(log_w - logsumexp(log_w))
    d = b[shared] - a[shared]
    return float(np.sum(q * d)), float(np.sum(q * d * d))


def ref_alpha(logp_theta, logp_target):
    """(alpha*, g): brentq on the derivative g inside (0, 1), else the boundary and g there."""
    g0, _ = ref_derivative(logp_theta, logp_target, 0.0)
    g1, _ = ref_derivative(logp_theta, logp_target, 1.0)
    if g0 >= 0:
        return 0.0, g0
    if g1 <= 0:
        return 1.0, g1

    def g(alpha):
        return ref_derivative(logp_theta, logp_target, alpha)[0]
    return brentq(g, 0.0, 1.0, xtol=1e-15, rtol=1e-15), 0.0


def kl_gap(logp_theta, logp_target, alpha):
    diag = token_diagnostics(logp_theta, logp_target, log_mixture(logp_theta, logp_target, alpha))
    return diag["kl_q_theta"] - diag["kl_q_target"]


def disjoint(logp_theta, logp_target):
    return not (np.isfinite(logp_theta) & np.isfinite(logp_target)).any()


# alpha* ------------------------------------------------------------------------------------

@SETTINGS
@given(pairs())
def test_alpha_in_unit_interval_and_kls_equal_inside(pair):
    logp_theta, logp_target = pair
    alpha = solve_alpha(logp_theta, logp_target)
    assert alpha.shape == () and 0.0 <= alpha <= 1.0
    if disjoint(logp_theta, logp_target):
        assert alpha == 0.5
        return
    gap = kl_gap(logp_theta, logp_target, alpha)  # = (log Z)'(alpha)
    if 0 < alpha < 1:
        assert abs(gap) <= 1e-6
    elif alpha == 0:
        assert gap >= -1e-9
    else:
        assert gap <= 1e-9


@SETTINGS
@given(pairs())
def test_alpha_matches_scipy(pair):
    logp_theta, logp_target = pair
    if disjoint(logp_theta, logp_target):
        return
    alpha = solve_alpha(logp_theta, logp_target)
    alpha_ref, g_end = ref_alpha(logp_theta, logp_target)
    if alpha_ref in (0.0, 1.0) and abs(g_end) > 1e-9:
        assert alpha == alpha_ref
    elif 0 < alpha_ref < 1:
        _, second_moment = ref_derivative(logp_theta, logp_target, alpha_ref)
        if second_moment > 1e-4:  # E[d^2] = Var[d] at the root: alpha* well conditioned
            assert abs(alpha - alpha_ref) <= 1e-6
        else:  # log Z is nearly flat: only the derivative is meaningful
            assert abs(ref_derivative(logp_theta, logp_target, alpha)[0]) <= 1e-9


@SETTINGS
@given(pairs())
def test_log_partition_convex_and_minimised_at_alpha(pair):
    logp_theta, logp_target = pair
    if disjoint(logp_theta, logp_target):
        assert log_partition(logp_theta, logp_target, 0.5) == NEG_INF
        return
    grid = np.linspace(0.0, 1.0, 101)
    log_z = log_partition(np.tile(logp_theta, (101, 1)), np.tile(logp_target, (101, 1)), grid)
    assert np.all(np.diff(log_z, 2) >= -1e-9)
    alpha = solve_alpha(logp_theta, logp_target)
    assert log_partition(logp_theta, logp_target, alpha) <= log_z.min() + 1e-9


@SETTINGS
@given(pairs(with_inf=False), st.floats(0.0, 1.0))
def test_log_mixture_is_the_normalised_geometric_mixture(pair, alpha):
    logp_theta, logp_target = pair
    log_q = log_mixture(logp_theta, logp_target, alpha)
    expected = ref_normalise((1 - alpha) * ref_normalise(logp_theta)
                             + alpha * ref_normalise(logp_target))
    np.testing.assert_allclose(log_q, expected, rtol=0, atol=1e-10)
    assert abs(logsumexp(log_q)) <= 1e-12


@SETTINGS
@given(pairs(), st.floats(0.0, 1.0))
def test_log_mixture_never_nan_and_normalised(pair, alpha):
    logp_theta, logp_target = pair
    log_q = log_mixture(logp_theta, logp_target, alpha)
    assert not np.isnan(log_q).any()
    if np.isfinite(logp_theta).any() or np.isfinite(logp_target).any():
        assert abs(logsumexp(log_q)) <= 1e-12
    diag = token_diagnostics(logp_theta, logp_target, log_q)
    assert not any(np.isnan(v).any() for v in diag.values())


def test_identical_distributions_give_one_half():
    logp = np.log([0.5, 0.3, 0.15, 0.05])
    assert solve_alpha(logp, logp) == 0.5
    assert solve_alpha(logp, logp + 3.0) == 0.5  # same distribution, not normalised
    assert solve_alpha(np.log([0.5, 0.5, 1e-300]), np.log([0.5, 0.5, 1e-300])) == 0.5
    np.testing.assert_allclose(log_mixture(logp, logp + 3.0, 0.5), logp, atol=1e-12)


def test_single_candidate():
    assert solve_alpha([-2.0], [-0.1]) == 0.5
    np.testing.assert_array_equal(log_mixture([-2.0], [-0.1], 0.5), [0.0])
    diag = token_diagnostics([-2.0], [-0.1], [0.0])
    assert diag["kl_q_theta"] == diag["kl_q_target"] == diag["entropy_q"] == 0.0


def test_one_hot_theta_takes_the_boundary():
    one_hot, spread = np.array([0.0, NEG_INF, NEG_INF]), np.log([0.5, 0.3, 0.2])
    # q is one-hot at token 0 for every alpha; KL(q||theta) = 0 < KL(q||target) = log 2
    assert solve_alpha(one_hot, spread) == 1.0
    assert solve_alpha(spread, one_hot) == 0.0
    np.testing.assert_array_equal(log_mixture(one_hot, spread, 1.0), one_hot)
    diag = token_diagnostics(one_hot, spread, one_hot)
    np.testing.assert_allclose([diag["kl_q_theta"], diag["kl_q_target"]], [0.0, np.log(2)])


def test_near_one_hot_rows_match_scipy():
    for peak in (20.0, 60.0, 300.0):
        logp_theta = np.array([0.0, -peak, -peak, -peak])
        logp_target = np.log([0.4, 0.3, 0.2, 0.1])
        alpha = solve_alpha(logp_theta, logp_target)
        assert 0 < alpha < 1
        assert abs(alpha - ref_alpha(logp_theta, logp_target)[0]) <= 1e-6
        assert abs(kl_gap(logp_theta, logp_target, alpha)) <= 1e-6


def test_candidate_missing_under_one_model():
    logp_theta = np.array([-1.0, -2.0, NEG_INF, -0.5, -3.0])
    logp_target = np.array([-1.5, NEG_INF, -3.0, -0.7, -0.2])
    alpha = solve_alpha(logp_theta, logp_target)
    assert 0 < alpha < 1
    assert abs(alpha - ref_alpha(logp_theta, logp_target)[0]) <= 1e-8
    assert abs(kl_gap(logp_theta, logp_target, alpha)) <= 1e-8
    for at in (0.0, alpha, 1.0):
        log_q = log_mixture(logp_theta, logp_target, at)
        assert np.all(log_q[1:3] == NEG_INF) and np.isfinite(log_q[[0, 3, 4]]).all()


def test_alpha_zero_and_one_are_limits_from_inside():
    logp_theta, logp_target = np.log([0.5, 0.3, 0.2]), np.array([-0.5, NEG_INF, -1.0])
    shared_theta = ref_normalise(np.array([np.log(0.5), NEG_INF, np.log(0.2)]))
    np.testing.assert_allclose(log_mixture(logp_theta, logp_target, 0.0), shared_theta)
    np.testing.assert_allclose(log_mixture(logp_theta, logp_target, 1e-12), shared_theta)
    np.testing.assert_allclose(log_mixture(logp_theta, logp_target, 1.0),
                               ref_normalise(logp_target))


def test_padding_columns_change_nothing():
    rng = np.random.default_rng(0)
    logp_theta, logp_target = rng.normal(size=6) * 3, rng.normal(size=6) * 3
    logp_target[2] = NEG_INF
    pad = np.full(3, NEG_INF)
    padded_theta, padded_target = np.r_[logp_theta, pad], np.r_[logp_target, pad]
    alpha = solve_alpha(logp_theta, logp_target)
    assert abs(solve_alpha(padded_theta, padded_target) - alpha) <= 1e-14
    log_q = log_mixture(padded_theta, padded_target, 0.3)
    np.testing.assert_allclose(log_q[:6], log_mixture(logp_theta, logp_target, 0.3), atol=1e-14)
    assert np.all(log_q[6:] == NEG_INF)


def test_disjoint_supports_use_the_arithmetic_mixture():
    logp_theta = np.array([0.0, -1.0, NEG_INF, NEG_INF, NEG_INF])
    logp_target = np.array([NEG_INF, NEG_INF, -0.3, -2.0, NEG_INF])
    assert solve_alpha(logp_theta, logp_target) == 0.5
    assert log_partition(logp_theta, logp_target, 0.5) == NEG_INF
    theta, target = np.exp(ref_normalise(logp_theta)), np.exp(ref_normalise(logp_target))
    for alpha in (0.0, 0.25, 0.5, 1.0):
        log_q = log_mixture(logp_theta, logp_target, alpha)
        np.testing.assert_allclose(np.exp(log_q), (1 - alpha) * theta + alpha * target)
    q = 0.5 * theta + 0.5 * target
    diag = token_diagnostics(logp_theta, logp_target, log_mixture(logp_theta, logp_target, 0.5))
    assert diag["kl_q_theta"] == diag["kl_q_target"] == np.inf
    np.testing.assert_allclose(diag["entropy_q"], -np.sum(q[q > 0] * np.log(q[q > 0])))


def test_one_model_empty_and_all_padding_rows():
    assert solve_alpha([NEG_INF, NEG_INF], [0.0, -1.0]) == 0.5
    for alpha in (0.0, 0.5, 1.0):  # the empty model gets no weight
        np.testing.assert_allclose(log_mixture([NEG_INF, NEG_INF], [0.0, -1.0], alpha),
                                   ref_normalise(np.array([0.0, -1.0])))
        np.testing.assert_allclose(log_mixture([0.0, -1.0], [NEG_INF, NEG_INF], alpha),
                                   ref_normalise(np.array([0.0, -1.0])))
    assert solve_alpha([NEG_INF, NEG_INF], [NEG_INF, NEG_INF]) == 0.5
    log_q = log_mixture([NEG_INF, NEG_INF], [NEG_INF, NEG_INF], 0.5)
    assert np.all(log_q == NEG_INF)
    with pytest.raises(ValueError, match="no probability mass"):
        inverse_cdf(log_q, 0.5)


def test_tighter_tol_agrees():
    rng = np.random.default_rng(1)
    logp_theta, logp_target = rng.normal(size=(64, 50)) * 4, rng.normal(size=(64, 50)) * 4
    np.testing.assert_allclose(solve_alpha(logp_theta, logp_target),
                               solve_alpha(logp_theta, logp_target, tol=1e-14), atol=1e-9)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        solve_alpha([0.0, np.nan], [0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        solve_alpha([0.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        log_mixture([0.0, 0.0], [0.0, -1.0], 1.5)
    with pytest.raises(ValueError, match="tol"):
        solve_alpha([0.0], [0.0], tol=0.0)


def test_batches_match_row_by_row():
    rng = np.random.default_rng(2)
    shape = (3, 5, 9)  # (B, T, K)
    logp_theta, logp_target = rng.normal(size=shape) * 4, rng.normal(size=shape) * 4
    logp_theta[rng.random(shape) < 0.2] = NEG_INF
    logp_target[rng.random(shape) < 0.2] = NEG_INF
    logp_target[0, 0] = logp_theta[0, 0]  # identical
    logp_target[0, 1] = np.where(np.isfinite(logp_theta[0, 1]), NEG_INF, 0.0)  # disjoint
    alpha = solve_alpha(logp_theta, logp_target)
    flat = solve_alpha(logp_theta.reshape(15, 9), logp_target.reshape(15, 9))
    log_q = log_mixture(logp_theta, logp_target, alpha)
    diag = token_diagnostics(logp_theta, logp_target, log_q)
    uniforms = rng.random(shape[:-1])
    idx = inverse_cdf(log_q, uniforms)
    assert alpha.shape == idx.shape == diag["entropy_q"].shape == shape[:-1]
    np.testing.assert_allclose(flat.reshape(3, 5), alpha, rtol=0, atol=1e-12)
    for i in np.ndindex(*shape[:-1]):
        assert abs(solve_alpha(logp_theta[i], logp_target[i]) - alpha[i]) <= 1e-12
        np.testing.assert_allclose(log_mixture(logp_theta[i], logp_target[i], alpha[i]),
                                   log_q[i], atol=1e-12)
        row_diag = token_diagnostics(logp_theta[i], logp_target[i], log_q[i])
        for key, value in row_diag.items():
            np.testing.assert_allclose(value, diag[key][i], atol=1e-12)
        assert inverse_cdf(log_q[i], uniforms[i]) == idx[i]


# merge_topk ---------------------------------------------------------------------------------

VOCAB = 30


@st.composite
def topk_lists(draw, batch):
    """(ids, logp) (B, K) with distinct ids per row, -1 padding anywhere, logp in [-20, -2]."""
    k = draw(st.integers(1, 6))
    ids = np.full((batch, k), -1, dtype=np.int64)
    logp = np.full((batch, k), NEG_INF)
    for row in range(batch):
        chosen = draw(st.lists(st.integers(0, VOCAB - 1), max_size=k, unique=True))
        slots = draw(st.permutations(range(k)))[:len(chosen)]
        ids[row, slots] = chosen
        logp[row, slots] = draw(st.lists(st.floats(-20.0, -2.0), min_size=len(chosen),
                                         max_size=len(chosen)))
    return ids, logp


def ref_fill(entries, missing):
    if not entries or missing == "floor":
        return NEG_INF
    kth = min(entries.values())
    if missing == "kth":
        return kth
    rest = max(0.0, 1.0 - sum(np.exp(v) for v in entries.values()))
    return min(np.log(rest / (VOCAB - len(entries))) if rest > 0 else NEG_INF, kth)


def ref_merge_row(ids_theta, logp_theta, ids_target, logp_target, missing):
    theta = {int(i): float(v) for i, v in zip(ids_theta, logp_theta) if i >= 0}
    target = {int(i): float(v) for i, v in zip(ids_target, logp_target) if i >= 0}
    fill_theta, fill_target = ref_fill(theta, missing), ref_fill(target, missing)
    union = sorted(set(theta) | set(target))
    return union, [theta.get(i, fill_theta) for i in union], [target.get(i, fill_target)
                                                              for i in union]


@SETTINGS
@given(st.data())
def test_merge_topk_matches_dict_reference(data):
    batch = data.draw(st.integers(1, 4))
    ids_theta, logp_theta = data.draw(topk_lists(batch))
    ids_target, logp_target = data.draw(topk_lists(batch))
    for missing in MISSING_POLICIES:
        merged = merge_topk(ids_theta, logp_theta, ids_target, logp_target, missing, VOCAB)
        width = ids_theta.shape[1] + ids_target.shape[1]
        assert merged.ids.shape == merged.valid.shape == merged.logp_theta.shape == (batch, width)
        assert merged.ids.dtype == np.int64
        for row in range(batch):
            union, ref_theta, ref_target = ref_merge_row(
                ids_theta[row], logp_theta[row], ids_target[row], logp_target[row], missing)
            n = len(union)
            assert merged.valid[row].tolist() == [True] * n + [False] * (width - n)
            assert merged.ids[row].tolist() == union + [-1] * (width - n)
            np.testing.assert_allclose(merged.logp_theta[row, :n], ref_theta, atol=1e-12)
            np.testing.assert_allclose(merged.logp_target[row, :n], ref_target, atol=1e-12)
            assert np.all(merged.logp_theta[row, n:] == NEG_INF)
            assert np.all(merged.logp_target[row, n:] == NEG_INF)


def test_merge_topk_errors():
    ids, logp = np.array([[3, 4]]), np.array([[-0.5, -1.0]])
    with pytest.raises(ValueError, match="missing"):
        merge_topk(ids, logp, ids, logp, missing="zero")
    with pytest.raises(ValueError, match="vocab_size"):
        merge_topk(ids, logp, ids, logp, missing="uniform_rest")
    with pytest.raises(ValueError, match="twice"):
        merge_topk(np.array([[3, 3]]), logp, ids, logp)
    with pytest.raises(ValueError, match="shape"):
        merge_topk(ids, logp[:, :1], ids, logp)


def test_merge_then_solve_with_kth_keeps_every_candidate():
    merged = merge_topk(np.array([[5, 1, -1]]), np.log([[0.6, 0.3, 1.0]]),
                        np.array([[1, 7]]), np.log([[0.5, 0.4]]))
    np.testing.assert_array_equal(merged.ids, [[1, 5, 7, -1, -1]])
    np.testing.assert_allclose(merged.logp_theta[0, :3], np.log([0.3, 0.6, 0.3]))
    np.testing.assert_allclose(merged.logp_target[0, :3], np.log([0.5, 0.4, 0.4]))
    log_q = log_mixture(merged.logp_theta, merged.logp_target,
                        solve_alpha(merged.logp_theta, merged.logp_target))
    assert np.isfinite(log_q[0, :3]).all() and np.all(log_q[0, 3:] == NEG_INF)


# sampling -----------------------------------------------------------------------------------

def test_sampling_frequencies_match_q():
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.ones(8))
    n = 200_000
    idx = sample(np.tile(np.log(q), (n, 1)), np.random.default_rng(4))
    counts = np.bincount(idx, minlength=8)
    assert chisquare(counts, q * n).pvalue > 1e-3


def test_inverse_cdf_never_picks_zero_probability():
    log_q = np.array([NEG_INF, np.log(0.2), NEG_INF, NEG_INF, np.log(0.5), np.log(0.3), NEG_INF])
    uniforms = np.r_[0.0, 1e-300, np.nextafter(1.0, 0.0), 0.1, 0.5, 0.9,
                     np.random.default_rng(5).random(100_000)]
    idx = inverse_cdf(np.tile(log_q, (uniforms.size, 1)), uniforms)
    assert set(np.unique(idx)) == {1, 4, 5}
    assert idx[:6].tolist() == [1, 1, 5, 1, 4, 5]


def test_inverse_cdf_unnormalised_and_bad_uniforms():
    assert inverse_cdf(np.array([1000.0, 1000.0]), 0.75) == 1
    for bad in (1.0, -0.1, np.nan):
        with pytest.raises(ValueError, match="uniforms"):
            inverse_cdf(np.log([0.5, 0.5]), bad)


def test_sample_draws_one_uniform_per_row_from_rng():
    log_q = np.log(np.random.default_rng(6).dirichlet(np.ones(5), size=(4, 3)))
    expected = inverse_cdf(log_q, np.random.default_rng(7).random((4, 3)))
    np.testing.assert_array_equal(sample(log_q, np.random.default_rng(7)), expected)


# diagnostics --------------------------------------------------------------------------------

def test_token_diagnostics_against_direct_formulas():
    theta, target = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    log_q = log_mixture(np.log(theta) + 1.0, np.log(target) - 2.0, 0.4)  # unnormalised inputs
    q = np.exp(log_q)
    diag = token_diagnostics(np.log(theta) + 1.0, np.log(target) - 2.0, log_q)
    np.testing.assert_allclose(diag["kl_q_theta"], np.sum(q * np.log(q / theta)))
    np.testing.assert_allclose(diag["kl_q_target"], np.sum(q * np.log(q / target)))
    np.testing.assert_allclose(diag["entropy_q"], -np.sum(q * np.log(q)))


def test_topk_coverage_and_importance_weights():
    coverage = topk_coverage([[np.log(0.5), np.log(0.25), NEG_INF], np.log([0.1, 0.1, 0.1])])
    np.testing.assert_allclose(coverage, [0.75, 0.3])
    np.testing.assert_allclose(log_importance_weights([-1.0, NEG_INF], [-2.0, -0.5]),
                               [1.0, NEG_INF])
    with pytest.raises(ValueError, match="finite"):
        log_importance_weights([-1.0], [NEG_INF])


def test_effective_sample_size():
    assert effective_sample_size(np.full(7, -3.0)) == 7.0
    assert effective_sample_size(np.full(7, -1e4)) == 7.0
    assert effective_sample_size([0.0, -1000.0, -1000.0]) == 1.0
    assert effective_sample_size([NEG_INF, NEG_INF]) == 0.0
    log_w = np.random.default_rng(8).uniform(-3.0, 3.0, size=(4, 50))
    w = np.exp(log_w)
    direct = w.sum(-1) ** 2 / (w * w).sum(-1)
    np.testing.assert_allclose(effective_sample_size(log_w), direct, rtol=1e-12)
    np.testing.assert_allclose(effective_sample_size(log_w - 1e4), direct, rtol=1e-9)
    np.testing.assert_allclose(ess_fraction(log_w), direct / 50, rtol=1e-12)
    assert np.all((effective_sample_size(log_w) >= 1) & (effective_sample_size(log_w) <= 50))


# temperature and group weights ----------------------------------------------------------------

@SETTINGS
@given(pair=pairs(), temperature=st.floats(0.05, 20.0))
def test_temper_is_the_softmax_of_log_q_over_t(pair, temperature):
    log_q = log_mixture(*pair, solve_alpha(*pair))
    assume(np.isfinite(log_q).any())
    tempered = temper(log_q, temperature)
    support = np.isfinite(log_q)
    assert (np.isfinite(tempered) == support).all()  # the support never changes
    want = softmax(log_q[support] / temperature)  # scipy, closed form
    np.testing.assert_allclose(np.exp(tempered[support]), want, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(temper(temper(log_q, temperature), 2.0),
                               temper(log_q, 2.0 * temperature), atol=1e-9)


def test_temper_limits_rows_and_errors():
    log_q = np.array([np.log([0.5, 0.3, 0.2]), np.log([0.1, 0.1, 0.8])])
    log_q = np.concatenate([log_q, np.full((2, 1), NEG_INF)], axis=1)
    np.testing.assert_array_equal(temper(log_q, 1.0), log_q)  # T = 1: bit for bit
    np.testing.assert_allclose(np.exp(temper(log_q, 1e-3)), [[1, 0, 0, 0], [0, 0, 1, 0]],
                               atol=1e-12)
    np.testing.assert_allclose(np.exp(temper(log_q, 1e6)), [[1 / 3] * 3 + [0]] * 2, atol=1e-5)
    per_row = temper(log_q, np.array([0.5, 2.0]))  # (B,) temperatures
    np.testing.assert_allclose(per_row[1], temper(log_q[1], 2.0))
    np.testing.assert_allclose(np.exp(per_row[0]), np.array([25, 9, 4, 0]) / 38)
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="temperature"):
            temper(log_q, bad)


def test_sampling_at_temperature_half_matches_q_squared():
    q = np.random.default_rng(11).dirichlet(np.ones(6))
    n = 100_000
    idx = sample(np.tile(temper(np.log(q), 0.5), (n, 1)), np.random.default_rng(12))
    assert chisquare(np.bincount(idx, minlength=6), q ** 2 / np.sum(q ** 2) * n).pvalue > 1e-3


def test_normalised_weights():
    log_w = np.array([[0.0, np.log(3.0)], [NEG_INF, -5.0], [NEG_INF, NEG_INF]])
    np.testing.assert_allclose(normalised_weights(log_w), [[0.25, 0.75], [0, 1], [0, 0]])
    np.testing.assert_allclose(normalised_weights(np.array([-1e4, -1e4 + np.log(3)])),
                               [0.25, 0.75])


# the other alpha rules (issue 36): each against an independent scipy / closed form ----------
def ref_ess_alpha(logp_theta, logp_target):
    """brentq on the defining condition, log sum theta^2/q - log sum target^2/q = 0, with q
    the normalised geometric mixture over the shared support (each model normalised over its
    own support); an end of [0, 1] when the condition keeps one sign there."""
    a, b = ref_normalise(logp_theta), ref_normalise(logp_target)
    shared = np.isfinite(a) & np.isfinite(b)
    a, b = a[shared], b[shared]

    def gap(x):
        log_q = (1 - x) * a + x * b
        log_q = log_q - logsumexp(log_q)
        return logsumexp(2 * a - log_q) - logsumexp(2 * b - log_q)

    lo, hi = gap(0.0), gap(1.0)
    if np.allclose(a, b):
        return 0.5
    if lo >= 0:
        return 0.0
    if hi <= 0:
        return 1.0
    return brentq(gap, 0.0, 1.0, xtol=1e-14)


@SETTINGS
@given(pairs(with_inf=False, min_k=2))
def test_ess_balance_alpha_matches_scipy(pair):
    from dual_sampling.maths.mixture import ess_balance_alpha
    a, b = pair
    want = ref_ess_alpha(a, b)
    got = float(ess_balance_alpha(a, b))
    # the condition's slope in alpha can be tiny where both tilts agree: compare alphas where
    # the root is well conditioned, else the condition's value at ours
    assert abs(got - want) < 1e-6 or abs(ref_ess_gap(a, b, got)) < 1e-9


def ref_ess_gap(a, b, x):
    a, b = ref_normalise(a), ref_normalise(b)
    log_q = (1 - x) * a + x * b
    log_q = log_q - logsumexp(log_q)
    return logsumexp(2 * a - log_q) - logsumexp(2 * b - log_q)


@SETTINGS
@given(pairs(with_inf=False), st.floats(0.0, 0.6), st.floats(0.6, 1.0))
def test_entropy_rule_and_clamps_match_the_closed_form(pair, alpha_min, alpha_max):
    from dual_sampling.maths.mixture import choose_alpha
    a, b = (ref_normalise(x) for x in pair)
    h_a, h_b = -np.sum(np.exp(a) * a), -np.sum(np.exp(b) * b)
    want = 0.5 if h_a + h_b <= 0 else h_a / (h_a + h_b)
    got = choose_alpha(*pair, "entropy", alpha_min=alpha_min, alpha_max=alpha_max)
    # near one-hot rows have entropies of 1e-10..1e-8, whose ratio carries the two
    # normalisations' rounding (scipy's logsumexp against ours) over so small a sum
    assert abs(got - np.clip(want, alpha_min, alpha_max)) < 1e-6
    # kl_symmetry is solve_alpha (checked against scipy above), clamped
    kl = choose_alpha(*pair, "kl_symmetry", alpha_min=alpha_min, alpha_max=alpha_max)
    assert kl == np.clip(solve_alpha(*pair), alpha_min, alpha_max)
    assert choose_alpha(*pair, "fixed", alpha=0.3, alpha_min=alpha_min,
                        alpha_max=alpha_max) == np.clip(0.3, alpha_min, alpha_max)
    with pytest.raises(ValueError, match="needs an alpha"):
        choose_alpha(*pair, "fixed")
