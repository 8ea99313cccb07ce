"""Geometric mixture of two next-token distributions: alpha*, q*, merging, sampling, diagnostics.

Pure numpy, no I/O. Log-probabilities are natural logs; KLs and entropies are in nats.

Two models score a shared candidate set of K tokens: the policy theta and the target. The
geometric mixture is q_alpha(k) = theta(k)^(1-alpha) * target(k)^alpha / Z(alpha), and
alpha* in [0, 1] minimises the convex log Z(alpha). Its derivatives are

    d/dalpha   log Z = E_q[logp_target - logp_theta] = KL(q||theta) - KL(q||target)
    d2/dalpha2 log Z = Var_q[logp_target - logp_theta]

so an interior alpha* is where the two KLs are equal (the Chernoff point).

Sampling at a temperature T draws from q_T = q^(1/T) / sum q^(1/T) over the same
candidates (`temper`); alpha* stays the Chernoff point of the untempered pair.

Conventions, shared by every function here (none returns NaN):
- Each model is normalised over its own finite entries of the candidate set; the KLs are
  those of these candidate-set distributions.
- Shared support: q is 0 on a candidate that is -inf under either model. For alpha in (0, 1)
  that is the formula; at alpha in {0, 1} we take the limit from inside, so q_0 is theta
  restricted to the shared support and renormalised, and log Z is continuous on [0, 1].
  A candidate -inf under both models is padding and changes nothing.
- Flat log Z (identical distributions, K = 1): every alpha is a minimiser; alpha* = 0.5.
  Linear but not flat log Z (q the same for every alpha, e.g. one shared candidate with
  different probabilities): alpha* is the end of [0, 1] where log Z is lower.
- Disjoint supports (no candidate finite under both): the geometric mixture is 0/0.
  alpha* = 0.5, log Z = -inf, and log_mixture returns the arithmetic mixture
  (1-alpha) theta + alpha target, i.e. each model keeps its own tokens and its share of the
  mass (the KLs of q to each model are then +inf); a model with no finite entry in the row
  gets no share, so q is the other model. A row with no finite entry at all gives
  log q = -inf everywhere, which inverse_cdf refuses.
"""
from typing import NamedTuple

import numpy as np

MISSING_POLICIES = ("kth", "uniform_rest", "floor")
_MAX_ITER = 100


def _check_logp(name, logp):
    logp = np.asarray(logp, dtype=np.float64)
    if logp.ndim == 0 or logp.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., K) with K >= 1, got {logp.shape}")
    if not (logp < np.inf).all():
        raise ValueError(f"{name} must hold log-probabilities in [-inf, inf), found NaN or +inf")
    return logp


def _logsumexp(x):
    """logsumexp over the last axis; -inf (without a warning) for an all -inf slice."""
    m = np.max(x, axis=-1, keepdims=True)  # (..., 1)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.subtract(x, m)
    np.exp(w, out=w)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(w, axis=-1)) + m[..., 0]


def _normalise(logp):
    log_norm = _logsumexp(logp)[..., None]  # (..., 1)
    return logp - np.where(np.isfinite(log_norm), log_norm, 0.0)


def _prepare(logp_theta, logp_target):
    """Normalised a = logp_theta, b = logp_target, and the shared-support form of log q.

    log q_alpha + log Z = a_shared + alpha * d, with a_shared = a on the shared support and
    -inf off it, d = b - a on the support and 0 off it: written this way 0 * inf never occurs.
    """
    a = _normalise(_check_logp("logp_theta", logp_theta))  # (..., K)
    b = _normalise(_check_logp("logp_target", logp_target))  # (..., K)
    if a.shape != b.shape:
        raise ValueError(f"logp_theta {a.shape} and logp_target {b.shape} must have one shape")
    shared = np.isfinite(a) & np.isfinite(b)  # (..., K)
    a_shared = np.where(shared, a, -np.inf)
    d = np.subtract(b, a, out=np.zeros_like(a), where=shared)
    return a, b, a_shared, d


def _check_alpha(alpha, batch_shape):
    alpha = np.asarray(alpha, dtype=np.float64)
    if np.isnan(alpha).any() or (alpha < 0).any() or (alpha > 1).any():
        raise ValueError("alpha must lie in [0, 1]")
    return np.broadcast_to(alpha, batch_shape)


def _moments(a_shared, d, d_sq, alpha, work):
    """E_q[d] and Var_q[d] at alpha (N,), i.e. (log Z)' and (log Z)''; 0 for an empty support.

    a_shared, d, d_sq = d * d: (N, K); work: an (N, K) buffer, overwritten. Var = E[d^2] -
    E[d]^2 cancels only where |E[d]| is large, far from the root, where the Newton step is
    safeguarded anyway.
    """
    log_w = np.multiply(d, alpha[:, None], out=work)  # (N, K)
    log_w += a_shared
    m = np.max(log_w, axis=-1, keepdims=True)
    log_w -= np.where(np.isfinite(m), m, 0.0)
    w = np.exp(log_w, out=log_w)  # (N, K) q up to a factor
    total = np.sum(w, axis=-1)
    total = np.where(total > 0, total, 1.0)
    mean = np.einsum("nk,nk->n", w, d) / total
    return mean, np.einsum("nk,nk->n", w, d_sq) / total - mean * mean


def solve_alpha(logp_theta, logp_target, tol=1e-8):
    """alpha* in [0, 1] minimising log Z(alpha), where KL(q||theta) = KL(q||target) if interior.

    logp_theta, logp_target: (..., K) natural-log probabilities on a shared candidate set,
    normalised or not (each is normalised here), entries may be -inf (see module docstring).
    Returns alpha* of shape (...), float64. Raises ValueError on NaN/+inf or mismatched shapes.

    Method: log Z is convex, so its derivative g = E_q[d] is nondecreasing. All rows are
    solved at once by a safeguarded Newton from alpha = 0.5 (g = 0 there to rounding: log Z
    is flat, alpha* = 0.5). The bracket [lo, hi] starts at [0, 1] and keeps g(lo) < 0 < g(hi)
    at evaluated points. The Newton step alpha - g / Var_q[d] is taken when it lands inside
    the bracket; otherwise the step goes to the end of [0, 1] on the root's side if g there
    is not yet known (g(0) >= 0 makes alpha* = 0, g(1) <= 0 makes it 1), else bisects: so
    quadratic near the root, never slower than bisection, and the ends are evaluated only
    for rows that head there. A row stops when its error is below about tol (in alpha).
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    _, _, a_shared, d = _prepare(logp_theta, logp_target)
    batch_shape, K = a_shared.shape[:-1], a_shared.shape[-1]
    a_shared, d = a_shared.reshape(-1, K), d.reshape(-1, K)  # (N, K)
    d_sq = d * d
    # |Var_q[d]'| <= spread * Var_q[d], so after a Newton step s the error is about
    # |Var' / 2 Var| s^2 <= spread s^2 / 2 (while spread s is small): a row stops once
    # spread s^2 <= tol, one evaluation before its step itself drops below tol
    d_max, d_min = np.max(d, axis=-1), np.min(d, axis=-1)  # (N,) with the zeros off support
    spread = d_max - d_min  # (N,) >= the range of d on the support
    work = np.empty_like(d)
    x = np.full(a_shared.shape[0], 0.5)  # (N,)
    g, var = _moments(a_shared, d, d_sq, x, work)
    # g is a q-average of d, so its rounding error scales with |d|
    done = np.abs(g) <= 1e-13 * (1.0 + np.maximum(d_max, -d_min))  # flat: alpha* = 0.5
    alpha = x.copy()
    rows = np.arange(x.size)  # the working set: all rows until most are done, then the rest
    lo, hi = np.zeros(x.size), np.ones(x.size)
    lo_known, hi_known = np.zeros(x.size, bool), np.zeros(x.size, bool)
    for _ in range(_MAX_ITER):
        lo, lo_known = np.where(g < 0, x, lo), lo_known | (g < 0)
        hi, hi_known = np.where(g > 0, x, hi), hi_known | (g > 0)
        newton = x - g / np.where(var > 0, var, 1.0)
        newton_size = np.abs(newton - x)
        inside = ((newton > lo) & (newton < hi)) | (newton_size <= tol)
        use_newton = ((var > 0) | (g == 0)) & inside
        bisect = 0.5 * (lo + hi)
        fallback = np.where(g > 0, np.where(lo_known, bisect, lo), np.where(hi_known, bisect, hi))
        step = np.where(done, x, np.where(use_newton, np.clip(newton, lo, hi), fallback))
        converged = use_newton & (spread * newton_size ** 2 <= tol) & (spread * newton_size <= 0.1)
        done |= converged | (np.abs(step - x) <= tol)
        alpha[rows] = x = step
        if done.all():
            break
        if done.mean() > 0.5:
            keep = ~done
            working = (rows, a_shared, d, d_sq, spread, x, lo, hi, lo_known, hi_known, done)
            rows, a_shared, d, d_sq, spread, x, lo, hi, lo_known, hi_known, done = (
                v[keep] for v in working)
        g, var = _moments(a_shared, d, d_sq, x, work[:rows.size])
    return alpha.reshape(batch_shape)


TOKEN_FIELDS = ("alpha", "logp_theta", "logp_target", "logp_q", "kl_q_theta", "kl_q_target",
                "entropy_q")
"""What every engine records for each token it samples from q* over the whole vocabulary
(the fused engine, its speculative verify, the exact two-engine path; wire/fused_format.py
returns them)."""
ALPHA_METHODS = ("kl_symmetry", "ess_balance", "entropy", "fixed")


def ess_balance_alpha(logp_theta, logp_target, tol=1e-10):
    """alpha where the importance weights of q_alpha to each model have equal ESS:
    sum theta^2 / q = sum target^2 / q (ESS_m(q) = 1 / sum m^2 / q), shape (...).

    With a = logp_theta, d = logp_target - logp_theta on the shared support, theta^2 / q =
    Z exp(a - alpha d) and target^2 / q = Z exp(a + (2 - alpha) d), so the root is of
    h(alpha) = logsumexp(a + (2 - alpha) d) - logsumexp(a - alpha d), which decreases in
    alpha (the log moment generating function of d under theta is convex). h(0) <= 0 gives
    0 and h(1) >= 0 gives 1 (over a full vocabulary h(0) >= 0 >= h(1) always). Vectorised
    safeguarded Newton: h'(alpha) = E_r[d] - E_s[d], r and s the two tilted distributions.
    Identical rows (d = 0): 0.5.
    """
    _, _, a_shared, d = _prepare(logp_theta, logp_target)
    batch_shape, K = a_shared.shape[:-1], a_shared.shape[-1]
    a_shared, d = a_shared.reshape(-1, K), d.reshape(-1, K)

    def h_and_slope(x):
        up, down = a_shared + (2 - x)[:, None] * d, a_shared - x[:, None] * d  # (N, K)
        lse_up, lse_down = _logsumexp(up), _logsumexp(down)
        with np.errstate(invalid="ignore"):
            r = np.exp(up - np.where(np.isfinite(lse_up), lse_up, 0.0)[:, None])
            s = np.exp(down - np.where(np.isfinite(lse_down), lse_down, 0.0)[:, None])
        return lse_up - lse_down, np.sum(s * d, axis=-1) - np.sum(r * d, axis=-1)

    n = a_shared.shape[0]
    lo, hi = np.zeros(n), np.ones(n)
    h_lo, _ = h_and_slope(lo)
    h_hi, _ = h_and_slope(hi)
    alpha = np.full(n, 0.5)
    flat = np.all(d == 0, axis=-1) | ~np.isfinite(h_lo) | ~np.isfinite(h_hi)
    alpha[(h_lo <= 0) & ~flat] = 0.0
    alpha[(h_hi >= 0) & (h_lo > 0) & ~flat] = 1.0
    rows = np.flatnonzero((h_lo > 0) & (h_hi < 0) & ~flat)
    x = np.full(rows.size, 0.5)
    lo, hi = lo[rows], hi[rows]
    a_shared, d = a_shared[rows], d[rows]
    for _ in range(_MAX_ITER):
        if not rows.size:
            break
        h, slope = h_and_slope(x)
        lo, hi = np.where(h > 0, x, lo), np.where(h < 0, x, hi)
        newton = x - h / np.where(slope < 0, slope, -1.0)
        step = np.where((slope < 0) & (newton > lo) & (newton < hi), newton, 0.5 * (lo + hi))
        done = (np.abs(step - x) <= tol) | (h == 0)
        x = np.where(h == 0, x, step)
        alpha[rows] = x
        if done.all():
            break
    return alpha.reshape(batch_shape)


def entropy_alpha(logp_theta, logp_target):
    """alpha = H(theta) / (H(theta) + H(target)) per row (no solve), shape (...); 0.5 where
    both are 0. Each model is normalised over its own finite entries (as everywhere here)."""
    a = _normalise(_check_logp("logp_theta", logp_theta))
    b = _normalise(_check_logp("logp_target", logp_target))
    with np.errstate(invalid="ignore"):
        h_a = -np.sum(np.where(np.isfinite(a), np.exp(a) * a, 0.0), axis=-1)
        h_b = -np.sum(np.where(np.isfinite(b), np.exp(b) * b, 0.0), axis=-1)
    total = h_a + h_b
    return np.where(total > 0, h_a / np.where(total > 0, total, 1.0), 0.5)


def choose_alpha(logp_theta, logp_target, method="kl_symmetry", alpha=None, alpha_min=0.0,
                 alpha_max=1.0):
    """alpha per row by `method` (ALPHA_METHODS; `fixed` takes `alpha`), clamped to
    [alpha_min, alpha_max], shape (...)."""
    if method == "kl_symmetry":
        out = solve_alpha(logp_theta, logp_target)
    elif method == "ess_balance":
        out = ess_balance_alpha(logp_theta, logp_target)
    elif method == "entropy":
        out = entropy_alpha(logp_theta, logp_target)
    elif method == "fixed":
        if alpha is None:
            raise ValueError("alpha method `fixed` needs an alpha")
        out = np.broadcast_to(np.asarray(alpha, dtype=np.float64),
                              np.shape(logp_theta)[:-1]).copy()
    else:
        raise ValueError(f"unknown alpha method {method!r}; choose one of {ALPHA_METHODS}")
    return np.clip(out, alpha_min, alpha_max)


def log_partition(logp_theta, logp_target, alpha):
    """log Z(alpha) = logsumexp((1-alpha) a + alpha b) over the shared support, shape (...).

    a, b are the normalised inputs (..., K); alpha is scalar or broadcastable to (...), in
    [0, 1]. Convex in alpha; -inf for a row with disjoint supports.
    """
    _, _, a_shared, d = _prepare(logp_theta, logp_target)
    alpha = _check_alpha(alpha, a_shared.shape[:-1])
    return _logsumexp(a_shared + alpha[..., None] * d)


def log_mixture(logp_theta, logp_target, alpha):
    """Normalised log q_alpha, shape (..., K); alpha scalar or broadcastable to (...), in [0, 1].

    -inf off the shared support; the arithmetic mixture on rows with disjoint supports.
    """
    a, b, a_shared, d = _prepare(logp_theta, logp_target)
    alpha = _check_alpha(alpha, a.shape[:-1])[..., None]  # (..., 1)
    log_q = _normalise(a_shared + alpha * d)  # (..., K)
    disjoint = ~np.isfinite(a_shared).any(axis=-1, keepdims=True)  # (..., 1)
    # a model with no finite entry gets no weight, so q is the other model at every alpha
    alpha = np.where(~np.isfinite(a).any(axis=-1, keepdims=True), 1.0,
                     np.where(~np.isfinite(b).any(axis=-1, keepdims=True), 0.0, alpha))
    with np.errstate(divide="ignore"):
        log_arithmetic = np.logaddexp(np.log1p(-alpha) + a, np.log(alpha) + b)  # (..., K)
    return np.where(disjoint, _normalise(log_arithmetic), log_q)


class Candidates(NamedTuple):
    """Union of two top-k lists, per row: ids ascending, then padding (valid False)."""

    ids: np.ndarray  # (B, M) int64, -1 on padding
    logp_theta: np.ndarray  # (B, M) natural log, -inf on padding
    logp_target: np.ndarray  # (B, M) natural log, -inf on padding
    valid: np.ndarray  # (B, M) bool


def _check_topk(name, ids, logp):
    ids, logp = np.asarray(ids), np.asarray(logp, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != logp.shape or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids_{name} (integers) and logp_{name} must both have shape (B, K), "
                         f"got {ids.shape} {ids.dtype} and {logp.shape}")
    if (ids < -1).any() or not (logp < np.inf).all():
        raise ValueError(f"ids_{name} must be >= -1 (-1 = padding), logp_{name} in [-inf, inf)")
    return ids.astype(np.int64), logp


def _missing_logp(ids, logp, missing, vocab_size):
    """Log-probability to use for tokens a server did not return, one per row: (B,)."""
    returned = ids >= 0  # (B, K)
    kth = np.min(np.where(returned, logp, np.inf), axis=-1, initial=np.inf)  # (B,)
    kth = np.where(np.isposinf(kth), -np.inf, kth)  # nothing returned: nothing known
    if missing == "floor":
        return np.full_like(kth, -np.inf)
    if missing == "kth":
        return kth
    rest = np.clip(1.0 - np.sum(np.where(returned, np.exp(logp), 0.0), axis=-1), 0.0, 1.0)
    n_rest = vocab_size - np.sum(returned, axis=-1)  # (B,)
    with np.errstate(divide="ignore"):
        log_rest = np.where(n_rest > 0, np.log(rest) - np.log(np.maximum(n_rest, 1)), -np.inf)
    return np.minimum(log_rest, kth)


def merge_topk(ids_theta, logp_theta, ids_target, logp_target, missing="kth", vocab_size=None):
    """Merge two servers' top-k lists into one candidate set per row, without a row loop.

    ids_theta, logp_theta: (B, K1); ids_target, logp_target: (B, K2); id -1 marks padding
    (its logp is ignored). Returns Candidates with M = K1 + K2 columns: the union of ids,
    ascending, then padding. A token one server did not return has an unknown logp below
    that server's k-th (smallest returned) logp; `missing` chooses the value used:
    - "kth": the k-th logp itself, an upper bound. Overstates the missing token under that
      model, so it pulls q towards tokens only the other model ranks high; errs on the side
      of keeping them, the safe default.
    - "uniform_rest": the server's leftover mass 1 - sum(exp(top-k)) spread uniformly over
      its vocab_size - k unreturned tokens, capped at the k-th logp. Right on average for a
      flat tail, too low for a token that just missed the cut. Needs vocab_size.
    - "floor": -inf. The token drops out of the shared support (q = 0 there); q and alpha*
      then ignore the other model's preference for it.
    A server that returned no entry in a row gives -inf for every missing token. Raises
    ValueError on bad shapes, an unknown policy, no vocab_size for "uniform_rest", or an id
    repeated within one server's list.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    ids_theta, logp_theta = _check_topk("theta", ids_theta, logp_theta)
    ids_target, logp_target = _check_topk("target", ids_target, logp_target)
    if ids_theta.shape[0] != ids_target.shape[0]:
        raise ValueError(f"batch sizes differ: {ids_theta.shape[0]} vs {ids_target.shape[0]}")
    if missing == "uniform_rest":
        k = max(np.max(np.sum(listed >= 0, axis=-1), initial=0)
                for listed in (ids_theta, ids_target))
        if vocab_size is None or vocab_size < k:
            raise ValueError(f"missing='uniform_rest' needs vocab_size >= k, got {vocab_size}")
    fill_theta = _missing_logp(ids_theta, logp_theta, missing, vocab_size)[:, None]  # (B, 1)
    fill_target = _missing_logp(ids_target, logp_target, missing, vocab_size)[:, None]

    ids = np.concatenate([ids_theta, ids_target], axis=1)  # (B, M)
    logp = np.concatenate([logp_theta, logp_target], axis=1)  # (B, M)
    from_target = np.zeros(ids.shape, dtype=bool)
    from_target[:, ids_theta.shape[1]:] = True
    # sort by id, theta's entry before target's for a shared id, padding last
    key = np.where(ids >= 0, ids, np.iinfo(np.int64).max // 2) * 2 + from_target  # (B, M)
    order = np.argsort(key, axis=1, kind="stable")
    key, ids, logp, from_target = (np.take_along_axis(x, order, axis=1)
                                   for x in (key, ids, logp, from_target))
    if ((key[:, 1:] == key[:, :-1]) & (ids[:, 1:] >= 0)).any():
        raise ValueError("a token id appears twice in one server's top-k list")
    same_as_next = np.zeros(ids.shape, dtype=bool)  # (B, M) theta entry followed by target's
    same_as_next[:, :-1] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, :-1] >= 0)
    logp_next = np.concatenate([logp[:, 1:], np.full((ids.shape[0], 1), -np.inf)], axis=1)
    merged_theta = np.where(from_target, fill_theta, logp)  # (B, M)
    merged_target = np.where(from_target, logp, np.where(same_as_next, logp_next, fill_target))
    second = np.zeros(ids.shape, dtype=bool)  # (B, M) target's entry of a shared id
    second[:, 1:] = same_as_next[:, :-1]
    keep = (ids >= 0) & ~second  # (B, M) one entry per id

    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, order preserved
    ids, merged_theta, merged_target, keep = (np.take_along_axis(x, order, axis=1)
                                              for x in (ids, merged_theta, merged_target, keep))
    return Candidates(ids=np.where(keep, ids, -1),
                      logp_theta=np.where(keep, merged_theta, -np.inf),
                      logp_target=np.where(keep, merged_target, -np.inf),
                      valid=keep)


def inverse_cdf(log_q, uniforms):
    """Index along the last axis of log_q (..., K) at which the CDF first exceeds u * total.

    uniforms: (...) in [0, 1). log_q need not be normalised. Returns int64 (...); never an
    index with q = 0. Raises ValueError on a row with no mass or a uniform outside [0, 1).
    """
    log_q = _check_logp("log_q", log_q)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if uniforms.shape != log_q.shape[:-1]:
        raise ValueError(f"uniforms {uniforms.shape} must have shape {log_q.shape[:-1]}")
    if not ((uniforms >= 0) & (uniforms < 1)).all():
        raise ValueError("uniforms must lie in [0, 1)")
    if not np.isfinite(log_q).any(axis=-1).all():
        raise ValueError("log_q has a row with no probability mass (all -inf)")
    q = np.exp(log_q - np.max(log_q, axis=-1, keepdims=True))  # (..., K)
    cdf = np.cumsum(q, axis=-1)  # (..., K)
    idx = np.sum(cdf <= uniforms[..., None] * cdf[..., -1:], axis=-1)  # (...)
    # u * total can round up to total; the last positive entry is then the answer
    last = q.shape[-1] - 1 - np.argmax(q[..., ::-1] > 0, axis=-1)  # (...)
    return np.minimum(idx, last)


def temper(log_q, temperature):
    """log q_T = log(q^(1/T) / sum q^(1/T)) over the last axis: the tempered distribution.

    log_q: (..., K) normalised log-probabilities (as log_mixture returns), -inf allowed;
    temperature: scalar or broadcastable to (...), each > 0. T < 1 sharpens q, T > 1 flattens
    it over q's support (a -inf entry stays -inf). At T = 1 everywhere log_q is returned
    unchanged, so sampling at T = 1 is bit for bit sampling from q. Raises ValueError on a
    temperature that is not a finite number > 0.
    """
    log_q = _check_logp("log_q", log_q)
    temperature = np.asarray(temperature, dtype=np.float64)
    if not (np.isfinite(temperature) & (temperature > 0)).all():
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if (temperature == 1).all():
        return log_q
    t = np.broadcast_to(temperature, log_q.shape[:-1])[..., None]  # (..., 1)
    return _normalise(log_q / t)  # (..., K)


def sample(log_q, rng):
    """Draw one index per row of log_q (..., K) with uniforms from rng (a numpy Generator)."""
    return inverse_cdf(log_q, rng.random(np.shape(log_q)[:-1]))


def token_diagnostics(logp_theta, logp_target, log_q):
    """KL(q||theta), KL(q||target), H(q) in nats, each (...), from (..., K) candidate arrays.

    Every input is normalised over the candidate set first, so these are KLs between the
    candidate-set renormalised distributions. +inf where q has mass outside a model's support.
    """
    a, b, _, _ = _prepare(logp_theta, logp_target)
    log_q = _normalise(_check_logp("log_q", log_q))
    if log_q.shape != a.shape:
        raise ValueError(f"log_q {log_q.shape} must have shape {a.shape}")
    q = np.exp(log_q)  # (..., K)
    on_q = q > 0
    log_q = np.where(on_q, log_q, 0.0)

    def kl(logp_model):
        return np.sum(q * np.where(on_q, log_q - logp_model, 0.0), axis=-1)

    return {"kl_q_theta": kl(a), "kl_q_target": kl(b), "entropy_q": -np.sum(q * log_q, axis=-1)}


def topk_coverage(logp_topk):
    """Probability mass a server's own top-k list covers: sum of exp over the last axis, (...)."""
    return np.sum(np.exp(_check_logp("logp_topk", logp_topk)), axis=-1)


def log_importance_weights(logp_model_token, logp_q_token):
    """Per-token log w = logp_model - logp_q of the sampled tokens; the caller sums per sequence.

    logp_q_token must be finite (a token drawn from q has q > 0); raises ValueError otherwise.
    """
    logp_q_token = np.asarray(logp_q_token, dtype=np.float64)
    if not np.isfinite(logp_q_token).all():
        raise ValueError("logp_q_token must be finite: a token drawn from q has q > 0")
    return np.asarray(logp_model_token, dtype=np.float64) - logp_q_token


def effective_sample_size(log_w):
    """Kish ESS (sum w)^2 / sum w^2 over the last axis of log weights (..., N), in [1, N].

    Weights are rescaled by their max first (the ratio does not change), so log weights of
    -1e4 are fine and equal weights give exactly N. 0 where every weight is 0.
    """
    log_w = _check_logp("log_w", log_w)
    m = np.max(log_w, axis=-1, keepdims=True)  # (..., 1)
    any_mass = np.isfinite(m[..., 0])
    w = np.exp(log_w - np.where(np.isfinite(m), m, 0.0))  # (..., N), max 1
    sum_sq = np.sum(w * w, axis=-1)  # (...), >= 1 where any_mass
    ess = np.sum(w, axis=-1) ** 2 / np.where(any_mass, sum_sq, 1.0)
    return np.where(any_mass, np.clip(ess, 1.0, log_w.shape[-1]), 0.0)


def ess_fraction(log_w):
    """effective_sample_size / N, in [1/N, 1] (0 where every weight is 0)."""
    return effective_sample_size(log_w) / np.shape(log_w)[-1]


def normalised_weights(log_w):
    """Self-normalised importance weights w / sum w over the last axis of log_w (..., N).

    The weights a group of N samples of one prompt carries (GRPO/RLOO-style estimators):
    each in [0, 1], summing to 1; a -inf log weight gets 0, and an all -inf slice all 0.
    """
    log_w = _check_logp("log_w", log_w)
    log_total = _logsumexp(log_w)[..., None]  # (..., 1)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(log_total), np.exp(log_w - log_total), 0.0)
