"""The fused transport's math in torch, on the logits' device: alpha*, q*, sampling, diagnostics.

The torch twin of dual_sampling/mixture.py for full-vocabulary rows (the numpy module stays
the reference; tests/test_fused_math.py checks one against the other). Natural logs, nats.

    a, b = log_softmax(theta logits), log_softmax(target logits)      # (B, V); -inf = padding
    alpha, iters = solve_alpha(a, b, start)                           # (B,)
    log_q = log_mixture(a, b, alpha)                                  # (B, V) normalised
    token, logp_q = sample(log_q, temperature, uniforms(seeds, steps))

Over the full vocabulary both models are finite on every real id, so g(alpha) = (log Z)'
= E_q[logp_target - logp_theta] runs from g(0) = -KL(theta||target) <= 0 to
g(1) = KL(target||theta) >= 0: alpha* is the root of g in [0, 1], and [0, 1] brackets it
from the start. Identical rows (g = 0 everywhere) give alpha* = 0.5, as in mixture.py.
"""
from __future__ import annotations

import numpy as np
import torch

TOL = 1e-7  # alpha; the error after the last (converged) Newton step is ~ spread * TOL^2
MAX_ITER = 60
_FLAT_VAR = 1e-14  # Var_q[d] below this: the two rows are the same distribution


def shared_support(logp_theta: torch.Tensor, logp_target: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`a_shared` (a off the shared support -inf) and `d = b - a` (0 off it), (B, V) float64.

    log q_alpha + log Z = a_shared + alpha * d, with no inf - inf anywhere.
    """
    a, b = logp_theta.double(), logp_target.double()
    shared = torch.isfinite(a) & torch.isfinite(b)  # (B, V)
    a_shared = torch.where(shared, a, -torch.inf)
    d = torch.where(shared, b - a, 0.0)
    return a_shared, d


def _moments(a_shared: torch.Tensor, d: torch.Tensor, alpha: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[d] and Var_q[d] at alpha (n,): (log Z)' and (log Z)''. Inputs (n, V)."""
    log_w = torch.addcmul(a_shared, d, alpha[:, None])  # (n, V)
    log_w -= log_w.amax(dim=-1, keepdim=True)
    w = log_w.exp_()  # (n, V) q up to a factor
    total = w.sum(dim=-1)  # (n,)
    wd = w.mul_(d)  # (n, V)
    mean = wd.sum(dim=-1) / total
    return mean, (wd * d).sum(dim=-1) / total - mean * mean


def solve_alpha(logp_theta: torch.Tensor, logp_target: torch.Tensor,
                start: torch.Tensor | None = None, tol: float = TOL
                ) -> tuple[torch.Tensor, int]:
    """alpha* per row (B,) float64 (the Chernoff point), and the number of g evaluations.

    logp_theta, logp_target: (B, V) normalised log-probabilities over the full vocabulary
    (-inf only on padded ids). `start` (B,) in [0, 1] is a warm start (e.g. the row's alpha*
    at its previous token); 0.5 by default.

    Safeguarded Newton on the convex log Z: each iteration evaluates g and g' once for the
    rows still running, keeps the bracket [lo, hi] with g(lo) < 0 < g(hi), takes the Newton
    step when it lands inside the bracket and bisects otherwise. A row stops when its Newton
    step is below tol (its error is then below ~ spread * tol^2) or its bracket is narrower
    than tol.
    """
    a_shared, d = shared_support(logp_theta, logp_target)
    n_rows = a_shared.shape[0]
    x = (torch.full((n_rows,), 0.5, dtype=torch.float64, device=d.device) if start is None
         else start.to(device=d.device, dtype=torch.float64).clamp(0.0, 1.0))
    lo, hi = torch.zeros_like(x), torch.ones_like(x)
    rows = torch.arange(n_rows, device=d.device)  # the rows still running
    iters = 0
    while rows.numel() and iters < MAX_ITER:
        iters += 1
        xr, lor, hir = x[rows], lo[rows], hi[rows]
        g, var = _moments(a_shared[rows], d[rows], xr)
        lor = torch.where(g < 0, xr, lor)
        hir = torch.where(g > 0, xr, hir)
        flat = var <= _FLAT_VAR
        newton = xr - g / torch.where(flat, 1.0, var)
        inside = (newton > lor) & (newton < hir)
        step = torch.where(inside, newton, 0.5 * (lor + hir))
        done = flat | (g == 0) | (inside & ((newton - xr).abs() <= tol)) | (hir - lor <= tol)
        step = torch.where(flat, torch.full_like(step, 0.5), torch.where(g == 0, xr, step))
        x[rows], lo[rows], hi[rows] = step, lor, hir
        rows = rows[~done]
    return x, iters


def log_mixture(logp_theta: torch.Tensor, logp_target: torch.Tensor, alpha: torch.Tensor
                ) -> torch.Tensor:
    """Normalised log q_alpha (B, V) float64; alpha (B,). -inf off the shared support."""
    a_shared, d = shared_support(logp_theta, logp_target)
    log_q = torch.addcmul(a_shared, d, alpha.double()[:, None])  # (B, V)
    return log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)


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


def inverse_cdf(log_q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index (B,) int64 where the CDF of q (B, V) exceeds u * total; never a q = 0 id."""
    q = (log_q - log_q.amax(dim=-1, keepdim=True)).exp()  # (B, V)
    cdf = q.cumsum(dim=-1)  # (B, V)
    threshold = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
    idx = torch.searchsorted(cdf, threshold, right=True)[:, 0]  # (B,)
    # u * total can round up to total: the last positive entry is then the answer
    last = q.shape[-1] - 1 - (q.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    return torch.minimum(idx, last)


def diagnostics(logp_theta: torch.Tensor, logp_target: torch.Tensor, log_q: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """KL(q||theta), KL(q||target) and H(q) in nats, each (B,), over the full vocabulary."""
    q = log_q.exp()  # (B, V)
    on_q = q > 0
    log_q0 = torch.where(on_q, log_q, 0.0)

    def kl(logp_model: torch.Tensor) -> torch.Tensor:
        return (q * torch.where(on_q, log_q0 - logp_model.double(), 0.0)).sum(dim=-1)

    return {"kl_q_theta": kl(logp_theta), "kl_q_target": kl(logp_target),
            "entropy_q": -(q * log_q0).sum(dim=-1)}


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
