"""The fused transport's math in torch, on the logits' device: alpha*, q*, sampling, diagnostics.

The torch twin of dual_sampling/mixture.py for full-vocabulary rows (the numpy module stays
the reference; tests/test_fused_math.py checks one against the other). Natural logs, nats.

    rows = Rows.of(logp_theta, logp_target)        # (B, V) log-softmaxes; -inf = padding
    alpha, evaluations = solve_alpha(rows, start)  # (B,)
    mix = Mixture.at(rows, alpha)                  # q* unnormalised, log Z, KLs, entropy
    token = inverse_cdf(mix.weights, uniforms(seeds, steps))

Over the full vocabulary both models are finite on every real id, so g(alpha) = (log Z)'
= E_q[d], d = logp_target - logp_theta, runs from g(0) = -KL(theta||target) <= 0 to
g(1) = KL(target||theta) >= 0: alpha* is the root of g in [0, 1], and [0, 1] brackets it
from the start. Identical rows (g = 0 everywhere) give alpha* = 0.5, as in mixture.py.

Speed is the point here (the solve runs every engine step): each evaluation of g, g' and g''
at alpha is three passes over (n, V) (exp(a + alpha d), then one batched product with the
precomputed basis [1, d, d^2, d^3, a]), and the diagnostics come from the same moments:
KL(q||theta) = alpha E[d] - log Z, KL(q||target) = (alpha - 1) E[d] - log Z,
H(q) = log Z - E[a] - alpha E[d].
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

TOL = 1e-7  # alpha; see solve_alpha for the stopping rule
MAX_ITER = 60
_FLAT_VAR = 1e-14  # Var_q[d] below this: the two rows are the same distribution


class Rows(NamedTuple):
    """A batch of (theta, target) next-token rows in the form the solver uses, float64."""

    a: torch.Tensor  # (B, V) logp_theta on the shared support, -inf off it
    d: torch.Tensor  # (B, V) logp_target - logp_theta on the shared support, 0 off it
    basis: torch.Tensor  # (B, V, 5) [1, d, d^2, d^3, a (0 off the support)]
    spread: torch.Tensor  # (B,) max d - min d

    @classmethod
    def of(cls, logp_theta: torch.Tensor, logp_target: torch.Tensor) -> "Rows":
        """From normalised log-probabilities (B, V), any float dtype, -inf on padded ids."""
        a, b = logp_theta.double(), logp_target.double()
        d = b - a  # (B, V)
        if torch.isfinite(d.sum()):  # the usual case, all finite: no masks needed
            a_shared, a0 = a, a
        else:
            shared = torch.isfinite(a) & torch.isfinite(b)  # (B, V)
            d = torch.where(shared, d, 0.0)
            a_shared, a0 = torch.where(shared, a, -torch.inf), torch.where(shared, a, 0.0)
        d2 = d * d
        basis = torch.stack([torch.ones_like(d), d, d2, d2 * d, a0], dim=-1)  # (B, V, 5)
        return cls(a_shared, d, basis, d.amax(dim=-1) - d.amin(dim=-1))

    def take(self, index: torch.Tensor) -> "Rows":
        return Rows(*(x[index] for x in self))


def _moments(rows: Rows, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w = exp(a + alpha d) (n, V) (q* unnormalised; log Z <= 0, so no overflow) and
    their moments (n, 5): sum w, sum w d, sum w d^2, sum w d^3, sum w a."""
    w = torch.addcmul(rows.a, rows.d, alpha[:, None]).exp_()  # (n, V)
    return w, torch.bmm(w[:, None, :], rows.basis)[:, 0, :]  # (n, 4)


def solve_alpha(rows: Rows, start: np.ndarray | None = None, tol: float = TOL
                ) -> tuple[torch.Tensor, int]:
    """alpha* per row (B,) float64 (the Chernoff point), and the number of evaluations of g.

    `start` (B,) in [0, 1] is a warm start (e.g. the row's alpha* at its previous token);
    0.5 by default.

    Safeguarded Chebyshev (third-order Newton) on the convex log Z: each evaluation gives,
    for the rows still running, g = E_q[d], g' = Var_q[d] and g'' = the third central
    moment, all from one pass (`_moments`); the bracket [lo, hi] keeps g(lo) < 0 < g(hi).
    The step s = -g/g' - g'' g^2 / (2 g'^3) is taken when it lands inside the bracket, the
    Newton step -g/g' when that does, else the bracket is bisected. A row stops, taking its
    step, once the step's estimated error is below tol: (g''/g')^2 |s|^3 for a Chebyshev
    step (cubic convergence), |g''/2g'| s^2 for a Newton step, with the spread max d - min d
(>= |g''/g'|) for g''/g', or the bracket's width. The
    few per-row scalars live in numpy: one (n, 5) copy from the device per evaluation.
    """
    n_rows = rows.a.shape[0]
    device = rows.a.device
    x = np.full(n_rows, 0.5) if start is None else np.clip(np.asarray(start, np.float64), 0, 1)
    alpha = x.copy()
    lo, hi = np.zeros(n_rows), np.ones(n_rows)  # the running rows' brackets
    active = np.arange(n_rows)  # which rows are running
    spread = rows.spread.cpu().numpy()  # >= |g''/g'|: bounds the error constants
    evaluations = 0
    while evaluations < MAX_ITER:
        evaluations += 1
        _, m = _moments(rows, torch.from_numpy(x).to(device))
        m = m.cpu().numpy()
        g, e2, e3 = m[:, 1] / m[:, 0], m[:, 2] / m[:, 0], m[:, 3] / m[:, 0]
        var = e2 - g * g
        skew = e3 - 3 * g * e2 + 2 * g ** 3  # g''
        lo, hi = np.where(g < 0, x, lo), np.where(g > 0, x, hi)
        flat = var <= _FLAT_VAR
        curve = skew / np.where(flat, 1.0, var)  # g'' / g'
        newton = -g / np.where(flat, 1.0, var)
        cheb = newton - 0.5 * curve * newton * newton
        use_cheb = (x + cheb > lo) & (x + cheb < hi)
        use_newton = ~use_cheb & (x + newton > lo) & (x + newton < hi)
        error = np.where(use_cheb, spread * spread * np.abs(cheb) ** 3,
                         np.where(use_newton, 0.5 * spread * newton * newton, np.inf))
        step = np.where(use_cheb, x + cheb, np.where(use_newton, x + newton, 0.5 * (lo + hi)))
        step = np.where(flat, 0.5, np.where(g == 0, x, step))
        done = flat | (g == 0) | (error <= tol) | (hi - lo <= tol)
        alpha[active[done]] = step[done]
        if done.all():
            break
        keep = ~done
        if not keep.all():
            rows = rows.take(torch.from_numpy(keep).to(device))
        active, x, lo, hi, spread = active[keep], step[keep], lo[keep], hi[keep], spread[keep]
    else:
        alpha[active] = x
    return torch.from_numpy(alpha).to(device), evaluations


class Mixture(NamedTuple):
    """q* at alpha for a batch: unnormalised weights and what follows from their moments."""

    weights: torch.Tensor  # (B, V) q* * Z
    log_z: torch.Tensor  # (B,)
    kl_q_theta: torch.Tensor  # (B,) nats
    kl_q_target: torch.Tensor  # (B,)
    entropy_q: torch.Tensor  # (B,)

    @classmethod
    def at(cls, rows: Rows, alpha: torch.Tensor) -> "Mixture":
        alpha = alpha.to(rows.a)
        w, m = _moments(rows, alpha)
        log_z = m[:, 0].log()
        mean_d, mean_a = m[:, 1] / m[:, 0], m[:, 4] / m[:, 0]
        return cls(w, log_z, alpha * mean_d - log_z, (alpha - 1) * mean_d - log_z,
                   log_z - mean_a - alpha * mean_d)

    def log_q(self, rows: Rows, alpha: torch.Tensor) -> torch.Tensor:
        """Normalised log q* (B, V); -inf off the shared support."""
        return torch.addcmul(rows.a, rows.d, alpha.to(rows.a)[:, None]) - self.log_z[:, None]


def tempered(log_q: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log of q^(1/T) normalised, (B, V); a row with T <= 0 is the point mass on its argmax."""
    greedy = temperature <= 0  # (B,)
    scaled = log_q / torch.where(greedy, 1.0, temperature.double())[:, None]  # (B, V)
    log_qt = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    if greedy.any():
        point = torch.full_like(log_q[greedy], -torch.inf)
        point.scatter_(1, log_q[greedy].argmax(dim=-1, keepdim=True), 0.0)
        log_qt[greedy] = point
    return log_qt


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index (B,) int64 where the CDF of the weights (B, V) (unnormalised q, >= 0)
    exceeds u * total; never an index of weight 0."""
    cdf = weights.cumsum(dim=-1)  # (B, V)
    threshold = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
    idx = torch.searchsorted(cdf, threshold, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)
    zero = weights.gather(1, idx[:, None])[:, 0] <= 0
    if zero.any():  # u * total rounded up to total: the last positive entry is the answer
        positive = weights[zero] > 0
        last = weights.shape[-1] - 1 - positive.flip(-1).to(torch.int8).argmax(dim=-1)
        idx[zero] = last
    return idx


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per row from (seed, step) alone (splitmix64), (B,) float64.

    Stateless on purpose: a token's uniform depends on its request's seed and its position
    in the completion only, so tokens do not depend on batching, preemption or resume.
    """
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) + (steps.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
