"""The fused transport's math in torch, on the logits' device: alpha*, q*, sampling, diagnostics.

The torch twin of dual_sampling/maths/mixture.py for full-vocabulary rows (the numpy module stays
the reference; tests/test_fused_math.py checks one against the other). Natural logs, nats.

    rows = Rows.of(theta_logits, target_logits)     # (B, V) each: logits, any normalisation
    solution = solve(rows, start, fixed)           # alpha (B,) and q*'s block sums there
    mix = solution.mixture()                       # log Z, KL(q*||theta), KL(q*||target), H
    draw = sample(rows, solution, u, temperature)  # token ids (B,) and their log q

Over the full vocabulary both models are finite on every real id, so g(alpha) = (log Z)'
= E_q[d], d = logp_target - logp_theta, runs from g(0) = -KL(theta||target) <= 0 to
g(1) = KL(target||theta) >= 0: alpha* is the root of g in [0, 1], and [0, 1] brackets it
from the start. Identical rows (g = 0 everywhere) give alpha* = 0.5, as in mixture.py.

Speed is the point (this runs every engine step over B x V, V up to 151,936): every pass
over the vocabulary is ONE fused loop (`torch.compile`: a C++/OpenMP loop on CPU, a Triton
kernel on GPU) that reads both models' float32 logits and writes only per-block sums:

- `Rows.of`: each model's log normaliser (its max, then sums of exp over blocks of BLOCK
  ids, added in float64), the range of d (the reach of the Taylor step) and the mean and
  variance of d under each model (g and g' at alpha 0 and 1: the solver's first point);
- `_moment_blocks` at alpha: w = exp(a + alpha d) (a = logp_theta; q* unnormalised; log Z
  <= 0, so no overflow) and, per block, sum w, w d, w d^2, w d^3, w a; over the blocks in
  float64. One evaluation gives g, g' = Var_q[d] and g'' (the solver's step), and the one
  at the accepted alpha also gives log Z, both KLs and the entropy, and q*'s block masses:
  the token is drawn from those (which block) and one block's weights (which id). No
  (B, V) tensor is written: the rows stay the model's logits, nothing is copied to float64.

A step costs two such loops with alpha fixed (the normalisers, one evaluation) and usually
three with alpha* (the normalisers, two evaluations from `first_guess`, the last step by
Taylor's formula), against the dozen unfused passes of exp, products and row sums per
evaluation that eager torch needs. Block sums keep float32 partials short
(1,024 terms, ~1e-7 relative) before the float64 total; a long float32 accumulation over
151,936 ids loses 5e-5 (torch's own log_softmax does).

`DUAL_SAMPLING_EAGER_MATH=1` runs the same functions without torch.compile (also the
fallback, with a warning, where compiling fails: no C++ compiler, an unsupported device).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch

from dual_sampling.maths.mixture import TOKEN_FIELDS

TOL = 1e-7  # alpha; see solve for the stopping rule
MAX_ITER = 60
BLOCK = 1024  # ids per block: the sums' float32 partials and the inverse CDF's first level
CHUNK = 1 << 22  # ids (rows x vocabulary) per kernel call at most (_over_blocks)
REACH = 3e-3  # |s| max|d| up to which a step's sums come by Taylor's formula (solve)
_FLAT_VAR = 1e-14  # Var_q[d] below this: the two rows are the same distribution

log = logging.getLogger(__name__)


class _Kernel:
    """`fn` through torch.compile with dynamic shapes (one compile serves every batch size
    and block width; a single block row is specialised once more: `warm_up` does both at
    start-up), or eagerly: under DUAL_SAMPLING_EAGER_MATH=1, or once compiling has failed
    here (a warning says why)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        eager = os.environ.get("DUAL_SAMPLING_EAGER_MATH", "0") == "1"
        self.compiled = None if eager else torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compile failure: run eagerly
                log.warning("dual_sampling: torch.compile of %s failed (%s: %s); running it "
                            "eagerly (correct, slower)", self.fn.__name__,
                            type(exc).__name__, str(exc)[:300])
                self.compiled = None
        return self.fn(*args)


def _parts(logits: torch.Tensor) -> list[torch.Tensor]:
    """Views (B, nb, width) covering (B, V): blocks of BLOCK ids, then the rest as one block."""
    vocab = logits.shape[-1]
    width = min(BLOCK, vocab)
    whole = vocab // width * width
    parts = [logits[:, :whole].unflatten(1, (vocab // width, width))]
    if whole < vocab:
        parts.append(logits[:, whole:].unsqueeze(1))
    return parts


def _dtype(logits: torch.Tensor) -> torch.dtype:
    """What the kernels compute in: float64 for float64 rows (references, tests), else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _per_block(values: torch.Tensor, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-row values (B,) repeated for each of a part's blocks, (B * nb,)."""
    return values.to(dtype).repeat_interleave(blocks)


def _over_blocks(kernel: "_Kernel", theta: torch.Tensor, target: torch.Tensor,
                 *scalars: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """kernel(theta block rows, target block rows, per-block scalars...) over every part of
    the rows (or of the rows at `index`, which the scalars are then given for), as
    (B, nb, m) float32 (float64 for float64 rows; the kernels see 2-d block rows: one fused
    loop). At most CHUNK ids go to one call: the loop's intermediates then stay in the
    cache and the allocator reuses their memory (a call over 256 x 151,936 ids ran 3.9x
    slower than the same in calls of 32 rows: each call's fresh buffers fault in page by
    page); rows picked by `index` are copied one chunk at a time."""
    dtype = _dtype(theta)
    n_rows = theta.shape[0] if index is None else index.shape[0]
    step = max(1, CHUNK // theta.shape[-1])
    chunks = []
    for first in range(0, n_rows, step):
        picked = slice(first, first + step)
        if index is None:
            chunk_theta, chunk_target = theta[picked], target[picked]
        else:
            chunk_theta, chunk_target = theta[index[picked]], target[index[picked]]
        out = []
        for part_theta, part_target in zip(_parts(chunk_theta), _parts(chunk_target)):
            blocks = part_theta.shape[1]
            sums = kernel(part_theta, part_target,
                          *(_per_block(s[picked], blocks, dtype) for s in scalars))
            out.append(sums.view(chunk_theta.shape[0], blocks, -1))
        chunks.append(out[0] if len(out) == 1 else torch.cat(out, dim=1))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)


def _block_rows(theta: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, nb, width) views as rows (B * nb, width) in the kernels' dtype, and where both
    are finite."""
    width, dtype = theta.shape[-1], _dtype(theta)
    a, b = theta.reshape(-1, width).to(dtype), target.reshape(-1, width).to(dtype)
    return a, b, (a > -math.inf) & (b > -math.inf)


def _normaliser_blocks(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per block (N, 12): for theta, then the target, its max m, the sum of exp(x - m) over
    its finite ids and, over the ids finite in both, the sums of exp(x - m) u^k, k = 0..2
    (u = target - theta: the moments of d at alpha = 0 and 1, for the solver's first
    point); then the max and min of u over the ids finite in both."""
    a, b, shared = _block_rows(theta, target)
    u = torch.where(shared, b - a, 0.0)
    out = []
    for x in (a, b):
        top = x.amax(dim=-1, keepdim=True)
        e = torch.exp(x - top)
        e_shared = torch.where(shared, e, 0.0)
        e_u = e_shared * u
        out += [top[:, 0], e.sum(-1), e_shared.sum(-1), e_u.sum(-1), (e_u * u).sum(-1)]
    return torch.stack(out + [torch.where(shared, u, -math.inf).amax(-1),
                              torch.where(shared, u, math.inf).amin(-1)], -1)


def _moment_blocks(theta: torch.Tensor, target: torch.Tensor, c_theta: torch.Tensor,
                   c_target: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per block (N, 8): sums of w d^k (k = 0..4) and w a d^k (k = 0..2), a = theta - c_theta,
    d = (target - c_target) - a, w = exp(a + alpha d) on ids finite in both, 0 elsewhere;
    c_theta, c_target and alpha per block (N,)."""
    a, b, shared = _block_rows(theta, target)
    a, b = a - c_theta[:, None], b - c_target[:, None]
    d = torch.where(shared, b - a, 0.0)
    a = torch.where(shared, a, 0.0)
    w = torch.where(shared, torch.exp(a + alpha[:, None] * d), 0.0)
    w_d = w * d
    w_d2 = w_d * d
    w_d3 = w_d2 * d
    w_a = w * a
    w_ad = w_a * d
    return torch.stack([w.sum(-1), w_d.sum(-1), w_d2.sum(-1), w_d3.sum(-1), (w_d3 * d).sum(-1),
                        w_a.sum(-1), w_ad.sum(-1), (w_ad * d).sum(-1)], -1)


def _tempered_blocks(theta: torch.Tensor, target: torch.Tensor, c_theta: torch.Tensor,
                     c_target: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor
                     ) -> torch.Tensor:
    """For q*^tau (tau = 1 / temperature), per block (N, 2): the max of e = log q* + log Z
    and the sum of exp(tau (e - that max)); ids not finite in both count for nothing."""
    a, b, shared = _block_rows(theta, target)
    a, b = a - c_theta[:, None], b - c_target[:, None]
    e = torch.where(shared, a + alpha[:, None] * (b - a), -math.inf)
    top = e.amax(dim=-1, keepdim=True)
    return torch.stack([top[:, 0], torch.exp(tau[:, None] * (e - top)).sum(-1)], -1)


def _block_weights(theta: torch.Tensor, target: torch.Tensor, columns: torch.Tensor,
                   c_theta: torch.Tensor, c_target: torch.Tensor, alpha: torch.Tensor,
                   tau: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """exp(tau (e - top)) (n, K) float64 at per-row ids `columns` (n, K), e = log q* + log Z;
    0 at ids past the vocabulary or off the shared support (the inverse CDF's second level:
    one kernel, where a dozen eager ops over (n, BLOCK) took about half of the processor's
    time at 256 rows and V = 2,048)."""
    vocab = theta.shape[-1]
    at = columns.clamp(max=vocab - 1)
    a = theta.gather(1, at).double() - c_theta[:, None]
    b = target.gather(1, at).double() - c_target[:, None]
    shared = (columns < vocab) & (a > -math.inf) & (b > -math.inf)
    e = a + alpha[:, None] * (b - a)
    return torch.where(shared, torch.exp(tau[:, None] * (e - top[:, None])), 0.0)


_NORMALISERS = _Kernel(_normaliser_blocks)
_BLOCK_WEIGHTS = _Kernel(_block_weights)
_MOMENT_BLOCKS = _Kernel(_moment_blocks)
_TEMPERED_BLOCKS = _Kernel(_tempered_blocks)


def _log_total(top: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (max m_k, sum of exp(x - m_k)) (B, nb) as the row's log sum of exp(x)
    (B,) float64, and each block's share of it unnormalised: s_k exp(m_k - max_k m_k)."""
    scale, peak = _block_scale(top)
    mass = _scaled(scale, sums.double())
    return peak + mass.sum(dim=1).log(), mass


def _scaled(scale: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Block sums times their scale (B, nb[, m]); 0 for a block without finite ids, whose
    sums are NaN (exp(-inf - -inf))."""
    if sums.dim() > scale.dim():
        scale = scale[..., None]
    return torch.where(scale > 0, scale * sums, 0.0)


def _block_scale(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(m_k - max_k m_k) (B, nb) float64 (0 for a block without finite ids), and the max."""
    top = top.double()
    peak = top.amax(dim=1, keepdim=True)
    return torch.where(top > -math.inf, (top - peak).exp(), 0.0), peak[:, 0]


class Rows(NamedTuple):
    """A batch of (theta, target) next-token rows: the logits as the models gave them."""

    theta: torch.Tensor  # (B, V) theta's logits (any dtype; -inf: an id it never gives)
    target: torch.Tensor  # (B, V) the target's, over the same ids
    c_theta: torch.Tensor  # (B,) float64 log normaliser: logp_theta = theta - c_theta
    c_target: torch.Tensor  # (B,) float64
    d_range: torch.Tensor  # (B, 2) float64 min and max of target - theta (the logits)
    #                        over the shared support
    ends: torch.Tensor  # (B, 4) float64 g(0), g'(0), g(1), g'(1): the mean and variance of
    #                     d under theta and under the target (on the shared support)

    @classmethod
    def of(cls, theta: torch.Tensor, target: torch.Tensor) -> "Rows":
        """From both models' logits (B, V), unnormalised or log-softmaxed; views are fine
        (the composite model hands over its logits without a copy)."""
        n = _over_blocks(_NORMALISERS, theta, target)  # (B, nb, 12)
        c, ends = [], []
        for model in (0, 5):  # theta, target
            scale, peak = _block_scale(n[..., model])
            sums = _scaled(scale, n[..., model + 1: model + 5].double()).sum(dim=1)
            c.append(peak + sums[:, 0].log())
            mean = sums[:, 2] / sums[:, 1]  # of u = d + (c_target - c_theta)
            ends.append((mean, sums[:, 3] / sums[:, 1] - mean * mean))
        shift = c[1] - c[0]
        d_range = torch.stack([n[..., 11].amin(dim=1), n[..., 10].amax(dim=1)], -1).double()
        return cls(theta, target, c[0], c[1], d_range, torch.stack(
            [ends[0][0] - shift, ends[0][1], ends[1][0] - shift, ends[1][1]], -1))

    def d_reach(self) -> torch.Tensor:
        """(B,) max |d| over the shared support, d = logp_target - logp_theta."""
        return (self.d_range - (self.c_target - self.c_theta)[:, None]).abs().amax(dim=-1)

    def kernel_offsets(self) -> torch.Tensor:
        """(B, 2) float64: by how much the log normalisers the kernels use (rounded to their
        dtype) exceed the exact ones, theta's and the target's. Their sums are of
        w' = w exp(-kappa), kappa = offset_theta + alpha (offset_target - offset_theta), with
        d and a shifted by constants: `Solution` corrects for both (no float32 rounding of
        log Z's scale reaches the KLs, which vanish at alpha 0 and 1 to 1e-7)."""
        dtype = _dtype(self.theta)
        c = torch.stack([self.c_theta, self.c_target], -1)
        return c.to(dtype).double() - c

    @property
    def width(self) -> int:
        return min(BLOCK, self.theta.shape[-1])

    def take(self, index: torch.Tensor) -> "Rows":
        return Rows(*(x[index] for x in self))

    def moment_blocks(self, alpha: torch.Tensor, index: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        """(n, nb, 8) float32 block sums of w d^k (k = 0..4), w a d^k (k = 0..2) at alpha
        (n,), of every row (n = B) or of the rows at `index` (n,)."""
        c_theta, c_target = self.c_theta, self.c_target
        if index is not None:
            c_theta, c_target = c_theta[index], c_target[index]
        return _over_blocks(_MOMENT_BLOCKS, self.theta, self.target, c_theta, c_target,
                            alpha, index=index)

    def at(self, token: torch.Tensor, index: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp_theta, d) (n,) float64 at per-row ids (n,): of every row, or of the rows at
        `index` (n,) (a gather of (row, id) pairs: no row is copied)."""
        if index is None:
            at = token[:, None]
            a = self.theta.gather(1, at)[:, 0].double() - self.c_theta
            return a, self.target.gather(1, at)[:, 0].double() - self.c_target - a
        a = self.theta[index, token].double() - self.c_theta[index]
        return a, self.target[index, token].double() - self.c_target[index] - a

    def exponents(self, alpha: torch.Tensor, columns: slice | torch.Tensor = slice(None)
                  ) -> torch.Tensor:
        """log q* + log Z = logp_theta + alpha d (n, K) float64 at `columns` (a slice of ids,
        or per-row ids (n, K)); -inf off the shared support."""
        if isinstance(columns, slice):
            theta, target = self.theta[:, columns], self.target[:, columns]
        else:
            theta, target = self.theta.gather(1, columns), self.target.gather(1, columns)
        a = theta.double() - self.c_theta[:, None]
        b = target.double() - self.c_target[:, None]
        shared = torch.isfinite(a) & torch.isfinite(b)
        return torch.where(shared, a + alpha.double()[:, None] * (b - a), -math.inf)

    def log_q(self, alpha: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
        """Normalised log q* (B, V) float64; -inf off the shared support."""
        return self.exponents(alpha) - log_z[:, None]


class Mixture(NamedTuple):
    """What q* at alpha gives per row, from its moments (all (B,) float64, nats)."""

    log_z: torch.Tensor
    kl_q_theta: torch.Tensor
    kl_q_target: torch.Tensor
    entropy_q: torch.Tensor

    def take(self, index: torch.Tensor) -> "Mixture":
        return Mixture(*(x[index] for x in self))


class Solution(NamedTuple):
    """alpha per row and q*'s block sums there (what `solve` ends with)."""

    alpha: torch.Tensor  # (B,) float64
    blocks: torch.Tensor  # (B, nb, 8) float64: sums of w d^k (k = 0..4), w a d^k (k = 0..2)
    evaluations: int  # of the moments (passes over the vocabulary)
    offsets: torch.Tensor  # (B, 2) float64: Rows.kernel_offsets

    def take(self, index: torch.Tensor) -> "Solution":
        return Solution(self.alpha[index], self.blocks[index], self.evaluations,
                        self.offsets[index])

    @property
    def kappa(self) -> torch.Tensor:
        """(B,) log of how much the block sums' w fall short of exp(log q* + log Z)."""
        return self.offsets[:, 0] + self.alpha * (self.offsets[:, 1] - self.offsets[:, 0])

    def mixture(self) -> Mixture:
        """KL(q||theta) = alpha E[d] - log Z, KL(q||target) = (alpha - 1) E[d] - log Z,
        H(q) = log Z - E[a] - alpha E[d], with log q = a + alpha d - log Z."""
        m = self.blocks.sum(dim=1)  # (B, 8)
        log_z = m[:, 0].log() + self.kappa
        mean_d = m[:, 1] / m[:, 0] + (self.offsets[:, 1] - self.offsets[:, 0])
        mean_a = m[:, 5] / m[:, 0] + self.offsets[:, 0]
        return Mixture(log_z, self.alpha * mean_d - log_z, (self.alpha - 1) * mean_d - log_z,
                       log_z - mean_a - self.alpha * mean_d)


def solve(rows: Rows, start: Optional[np.ndarray] = None, fixed: Optional[np.ndarray] = None,
          tol: float = TOL) -> Solution:
    """alpha* per row (the Chernoff point), or alpha fixed where `fixed` (B,) bool says so,
    with q*'s block sums at it.

    `start` (B,) in [0, 1]: a fixed row's alpha, a solved row's first point; NaN (and the
    default) takes `first_guess` from the ends' moments (Rows.ends), which usually leaves
    one or two evaluations plus the Taylor step, with no state carried between tokens.

    Safeguarded Chebyshev (third-order Newton) on the convex log Z: each evaluation at x
    gives g = E_q[d], g' = Var_q[d] and g'' (third central moment); the bracket [lo, hi]
    keeps g(lo) < 0 < g(hi). The step s = -g/g' - g'' g^2 / (2 g'^3) is taken when it lands
    inside the bracket and its cubic term is at most a quarter of the Newton step -g/g', the
    Newton step when that lands inside, else the bracket is bisected. A row stops, taking
    its step, once the step's estimated error is below tol: 4 |(g''/g')^2 / 2 - g'''/6g'|
    |s|^3 for a Chebyshev step (cubic convergence), 4 |g''/2g'| s^2 for a Newton step, from
    the moments at x; or once the bracket is narrower than tol, or at MAX_ITER.

    The step is not evaluated again: when |s| max|d| <= REACH, q*'s block sums at x + s
    follow from those at x by Taylor's formula in s (`_shifted`: the kernels sum w d^k up to
    k = 4 and w a d^k up to k = 2, so what is left is below (REACH)^3 / 6 relative); a
    longer step is evaluated first. Evaluation points are float32 (the kernels' alpha); the
    alpha returned is x + s in float64 (a fixed alpha exactly). Only running rows are
    evaluated again (gathered once they are at most half of the batch).
    """
    n_rows = rows.theta.shape[0]
    device = rows.theta.device
    goal = np.full(n_rows, np.nan) if start is None else np.asarray(start, np.float64).copy()
    guess = np.isnan(goal)
    if guess.any():
        goal[guess] = first_guess(rows.ends[torch.from_numpy(guess).to(device)].cpu().numpy())
    goal = np.clip(goal, 0.0, 1.0)
    fixed = np.zeros(n_rows, bool) if fixed is None else np.asarray(fixed, bool)
    x = goal.astype(np.float32).astype(np.float64)  # the point each row is evaluated at
    alpha = goal.copy()
    running = np.ones(n_rows, bool)
    lo, hi = np.zeros(n_rows), np.ones(n_rows)
    reach = rows.d_reach().cpu().numpy()  # max |d| over the shared support
    offsets = rows.kernel_offsets()
    d_offset = (offsets[:, 1] - offsets[:, 0]).cpu().numpy()  # E[d] - E[the kernels' d]
    blocks = None  # (B, nb, 8) float64 at each finished row's alpha
    evaluations = 0
    while running.any():
        evaluations += 1
        if blocks is None or 2 * running.sum() > n_rows:
            seen = np.arange(n_rows)
            sums = rows.moment_blocks(torch.from_numpy(x).to(device))  # (B, nb, 8)
        else:
            seen = np.flatnonzero(running)
            sums = rows.moment_blocks(torch.from_numpy(x[seen]).to(device),
                                      torch.from_numpy(seen).to(device))
        if blocks is None:
            blocks = torch.empty(sums.shape, dtype=torch.float64, device=device)
        now = seen[running[seen]]  # the running rows, in `sums` at `inner`
        inner = np.flatnonzero(running[seen])
        step = np.where(fixed[now], alpha[now] - x[now], 0.0)
        done = fixed[now].copy()
        solving = np.flatnonzero(~fixed[now])
        if len(solving):
            rows_s = now[solving]
            m = sums[torch.from_numpy(inner[solving]).to(device)].double().sum(dim=1).cpu().numpy()
            s, stop = _chebyshev(m, d_offset[rows_s], x[rows_s], lo, hi, rows_s,
                                 tol, evaluations >= MAX_ITER)
            step[solving], done[solving] = s, stop
        near = np.abs(step) * reach[now] <= REACH
        finished = done & near
        if finished.any():
            rows_f = now[finished]
            alpha[rows_f] = x[rows_f] + step[finished]
            picked = torch.from_numpy(inner[finished]).to(device)
            blocks[torch.from_numpy(rows_f).to(device)] = _shifted(
                sums[picked].double(), torch.from_numpy(step[finished]).to(device))
            running[rows_f] = False
        moving = ~finished
        x[now[moving]] = (x[now[moving]] + step[moving]).astype(np.float32)
    return Solution(torch.from_numpy(alpha).to(device), blocks, evaluations, offsets)


def _chebyshev(m: np.ndarray, d_offset: np.ndarray, x: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, rows: np.ndarray, tol: float, last: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """One safeguarded step from the kernels' moments m (n, 8) at x (n,) of `rows` (their
    d is off by -d_offset), whose brackets lo, hi (all rows) it narrows in place:
    (step (n,), whether x + step is alpha*)."""
    g, e2, e3, e4 = (m[:, k] / m[:, 0] for k in range(1, 5))
    var = e2 - g * g
    skew = e3 - 3 * g * e2 + 2 * g ** 3  # g''
    third = e4 - 4 * g * e3 + 6 * g * g * e2 - 3 * g ** 4 - 3 * var * var  # g'''
    g = g + d_offset
    lo[rows] = np.where(g < 0, x, lo[rows])
    hi[rows] = np.where(g > 0, x, hi[rows])
    low, high = lo[rows], hi[rows]
    flat = var <= _FLAT_VAR
    safe_var = np.where(flat, 1.0, var)
    newton = -g / safe_var
    correction = -0.5 * (skew / safe_var) * newton * newton
    cheb = newton + correction
    # the cubic term must be a correction: far from the root it can cancel the Newton
    # step (and its error estimate with it), stopping a row at a wrong alpha
    use_cheb = ((np.abs(correction) <= 0.25 * np.abs(newton))
                & (x + cheb > low) & (x + cheb < high))
    use_newton = ~use_cheb & (x + newton > low) & (x + newton < high)
    curve = skew / safe_var  # g'' / g'
    # e' = K e^3 for a Chebyshev step, (g''/2g') e^2 for a Newton one; 4x for safety
    cubic = np.abs(0.5 * curve * curve - third / (6 * safe_var))
    error = 4 * np.where(use_cheb, cubic * np.abs(cheb) ** 3,
                         np.where(use_newton, 0.5 * np.abs(curve) * newton * newton, np.inf))
    step = np.where(use_cheb, cheb, np.where(use_newton, newton, 0.5 * (low + high) - x))
    # alpha* = x itself; at the last evaluation whatever the moments say (NaN included)
    here = (g == 0) | last | ((error > tol) & (high - low <= tol))
    # identical rows: alpha* = 0.5, as in mixture.py
    step = np.where(flat, 0.5 - x, np.where(here, 0.0, step))
    return step, flat | here | (error <= tol)


_QUINTIC = np.linalg.inv(np.array([[1.0, 1, 1], [3, 4, 5], [6, 12, 20]]))
_GRID = np.linspace(0.0, 1.0, 129)


def first_guess(ends: np.ndarray) -> np.ndarray:
    """alpha* estimated (n,) from g and g' at 0 and 1, `ends` (n, 4) (Rows.ends): the
    minimiser on [0, 1] of the quintic F with F = log Z = 0 at both ends and the same
    slopes and curvatures there; 0.5 where g does not change sign."""
    g0, v0, g1, v1 = ends.T
    c1, c2 = g0, v0 / 2
    rhs = np.stack([-(c1 + c2), g1 - c1 - 2 * c2, v1 - 2 * c2], -1)  # (n, 3)
    c3, c4, c5 = (rhs @ _QUINTIC.T).T
    x = _GRID[None, :]
    slope = (c1[:, None] + 2 * c2[:, None] * x + 3 * c3[:, None] * x ** 2
             + 4 * c4[:, None] * x ** 3 + 5 * c5[:, None] * x ** 4)  # F' on the grid
    up = (slope[:, :-1] < 0) & (slope[:, 1:] >= 0)
    i = up.argmax(axis=-1)
    rows = np.arange(len(i))
    low, high = slope[rows, i], slope[rows, i + 1]
    guess = _GRID[i] + (_GRID[1] - _GRID[0]) * low / np.where(high > low, low - high, -1.0)
    return np.where(up.any(axis=-1) & np.isfinite(guess), guess, 0.5)


def _shifted(sums: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Block sums (n, nb, 8) of w d^k (k = 0..4) and w a d^k (k = 0..2) at x, as at x + s
    (n,): w(x + s) = w(x) e^(s d), expanded to the terms these sums hold."""
    s = s[:, None]
    w0, w1, w2, w3, w4, a0, a1, a2 = sums.unbind(-1)
    return torch.stack([
        w0 + s * (w1 + s / 2 * (w2 + s / 3 * (w3 + s / 4 * w4))),
        w1 + s * (w2 + s / 2 * (w3 + s / 3 * w4)),
        w2 + s * (w3 + s / 2 * w4),
        w3 + s * w4,
        w4,
        a0 + s * (a1 + s / 2 * a2),
        a1 + s * a2,
        a2], -1)


class Draw(NamedTuple):
    """Sampled ids and their log-probability under the distribution they were drawn from."""

    token: torch.Tensor  # (n,) int64 vocabulary ids
    logp_q: torch.Tensor  # (n,) float64: log q* (temperature 1), log q*^(1/T) normalised
    #                       (temperature T), 0 (temperature 0: the argmax)


def sample(rows: Rows, solution: Solution, log_z: torch.Tensor, u: torch.Tensor,
           temperature: torch.Tensor) -> Draw:
    """One id per row from q* at the solution's alpha, tempered: q*^(1/T) normalised for
    T = temperature (n,) > 0, the argmax for T <= 0; by inverse CDF over the ids in order,
    with uniform u (n,): first the block (from the block masses), then the id inside it
    (from that block's weights alone)."""
    n_rows = rows.theta.shape[0]
    device = rows.theta.device
    token = torch.empty(n_rows, dtype=torch.int64, device=device)
    logp_q = torch.zeros(n_rows, dtype=torch.float64, device=device)
    temperature = temperature.double()
    alpha, kappa = solution.alpha, solution.kappa
    plain, greedy = temperature == 1.0, temperature <= 0.0
    if plain.all():  # the usual case: no copies of the rows
        token[:] = _inverse_cdf(rows, alpha, solution.blocks[:, :, 0], u,
                                torch.ones_like(alpha), kappa)
        a, d = rows.at(token)
        return Draw(token, a + alpha * d - log_z)
    if plain.any():
        part = rows.take(plain)
        token[plain] = _inverse_cdf(part, alpha[plain], solution.blocks[plain, :, 0], u[plain],
                                    torch.ones_like(alpha[plain]), kappa[plain])
        a, d = part.at(token[plain])
        logp_q[plain] = a + alpha[plain] * d - log_z[plain]
    tempered = ~plain & ~greedy
    if tempered.any():
        part, at = rows.take(tempered), alpha[tempered]
        tau = 1.0 / temperature[tempered]
        log_total, masses, top = _tempered(part, at, kappa[tempered], tau)
        token[tempered] = _inverse_cdf(part, at, masses, u[tempered], tau, top)
        a, d = part.at(token[tempered])
        logp_q[tempered] = tau * (a + at * d) - log_total
    if greedy.any():
        part = rows.take(greedy)
        token[greedy] = part.exponents(alpha[greedy]).argmax(dim=-1)
    return Draw(token, logp_q)




def _tempered(rows: Rows, alpha: torch.Tensor, kappa: torch.Tensor, tau: torch.Tensor,
              index: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q*^tau's log normaliser (n,) (log sum of exp(tau e), e = log q* + log Z), its block
    masses (n, nb) and the scale they were summed at (n,): one pass over the vocabulary, of
    every row or of the rows at `index` (n,) (alpha, kappa, tau are then theirs)."""
    c_theta, c_target = rows.c_theta, rows.c_target
    if index is not None:
        c_theta, c_target = c_theta[index], c_target[index]
    blocks = _over_blocks(_TEMPERED_BLOCKS, rows.theta, rows.target, c_theta, c_target,
                          alpha, tau, index=index)  # (n, nb, 2), e short by kappa
    log_total, masses = _log_total(blocks[..., 0].double() * tau[:, None], blocks[..., 1])
    top = blocks[..., 0].double().amax(dim=1) + kappa  # the row's max of e
    return log_total + tau * kappa, masses, top


def log_q_at(rows: Rows, solution: Solution, log_z: torch.Tensor, index: torch.Tensor,
             token: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log of q*^(1/T) normalised at ids `token` (n,) of the rows at `index` (n,) (the
    solution, log Z and T (n,) given per row of the batch, T per pair), float64, as `sample`
    reports a drawn id's: log q* at T = 1 (two gathers, no copy of a row), one pass over
    those rows at other T > 0, 0 at T <= 0 (the argmax)."""
    temperature = temperature.double()
    a, d = rows.at(token, index)
    alpha = solution.alpha[index]
    out = a + alpha * d - log_z[index]
    tempered = (temperature != 1.0) & (temperature > 0.0)
    if tempered.any():
        at, tau = alpha[tempered], 1.0 / temperature[tempered]
        log_total, _, _ = _tempered(rows, at, solution.kappa[index][tempered], tau,
                                    index=index[tempered])
        out[tempered] = tau * (a[tempered] + at * d[tempered]) - log_total
    return torch.where(temperature > 0.0, out, torch.zeros_like(out))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row (n, V) of non-negative weights (whole rows, materialised), the first id whose
    CDF exceeds u * total, never an id of weight 0 (`sample` does the same by blocks without
    materialising a row)."""
    cdf = weights.double().cumsum(dim=-1)
    threshold = u.double()[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, threshold, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
    bad = weights.gather(1, token[:, None])[:, 0] <= 0
    if bad.any():  # rounding at the top end: the last id of positive weight
        positive = weights[bad] > 0
        token[bad] = weights.shape[1] - 1 - positive.flip(-1).to(torch.int8).argmax(dim=-1)
    return token


def fields(rows: Rows, solution: Solution, mix: Mixture, token: torch.Tensor,
           logp_q: torch.Tensor, index: Optional[torch.Tensor] = None
           ) -> dict[str, torch.Tensor]:
    """FIELDS of drawn ids (n,), one per row, or at the rows `index` (n,): the record every
    engine keeps per token."""
    logp_theta, d = rows.at(token, index)
    if index is not None:
        solution, mix = solution.take(index), mix.take(index)
    return {"token": token, "alpha": solution.alpha, "logp_theta": logp_theta,
            "logp_target": logp_theta + d, "logp_q": logp_q, "kl_q_theta": mix.kl_q_theta,
            "kl_q_target": mix.kl_q_target, "entropy_q": mix.entropy_q}


def rule_alpha(rows: Rows, method: str, max_iter: int = 60, tol: float = 1e-10
               ) -> torch.Tensor:
    """alpha (B,) float64 by `ess_balance` or `entropy` over the whole vocabulary: the torch
    twin of mixture.ess_balance_alpha / entropy_alpha (see there for the math). Eager torch
    over (B, V) float64 log-probabilities: a few passes for entropy, two a Newton step for
    ess_balance (5-8 steps); the default rule, kl_symmetry, keeps `solve`'s fused passes.
    The caller then evaluates q* at this alpha with `solve(..., fixed=...)`."""
    a = rows.theta.double() - rows.c_theta[:, None]  # (B, V) log theta
    b = rows.target.double() - rows.c_target[:, None]  # (B, V) log target
    if method == "entropy":
        h_a = -(a.exp() * a).nan_to_num(0.0).sum(dim=-1)
        h_b = -(b.exp() * b).nan_to_num(0.0).sum(dim=-1)
        total = h_a + h_b
        return torch.where(total > 0, h_a / total.clamp(min=1e-300),
                           torch.full_like(total, 0.5))
    if method != "ess_balance":
        raise ValueError(f"rule_alpha computes ess_balance or entropy, not {method!r}")
    shared = torch.isfinite(a) & torch.isfinite(b)
    a = torch.where(shared, a, -torch.inf)
    d = torch.where(shared, b - a, 0.0)

    def h_and_slope(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = a + (2 - x)[:, None] * d, a - x[:, None] * d
        lse_up, lse_down = up.logsumexp(dim=-1), down.logsumexp(dim=-1)
        r, s = (up - lse_up[:, None]).exp(), (down - lse_down[:, None]).exp()
        return lse_up - lse_down, (s * d).sum(dim=-1) - (r * d).sum(dim=-1)

    n = a.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64, device=a.device)
    h_lo, _ = h_and_slope(zeros)
    h_hi, _ = h_and_slope(zeros + 1)
    flat = (d == 0).all(dim=-1) | ~torch.isfinite(h_lo) | ~torch.isfinite(h_hi)
    alpha = torch.full_like(zeros, 0.5)
    alpha[(h_lo <= 0) & ~flat] = 0.0
    alpha[(h_hi >= 0) & (h_lo > 0) & ~flat] = 1.0
    todo = (h_lo > 0) & (h_hi < 0) & ~flat
    if todo.any():
        a, d = a[todo], d[todo]
        x = torch.full((a.shape[0],), 0.5, dtype=torch.float64, device=a.device)
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(max_iter):
            h, slope = h_and_slope(x)
            lo, hi = torch.where(h > 0, x, lo), torch.where(h < 0, x, hi)
            newton = x - h / torch.where(slope < 0, slope, -1.0)
            step = torch.where((slope < 0) & (newton > lo) & (newton < hi), newton,
                               0.5 * (lo + hi))
            step = torch.where(h == 0, x, step)
            moved = (step - x).abs().max()
            x = step
            if moved <= tol:
                break
        alpha[todo] = x
    return alpha


def solve_rules(rows: Rows, methods: Optional[list[str]] = None,
                alpha: Optional[np.ndarray] = None, alpha_min: Optional[np.ndarray] = None,
                alpha_max: Optional[np.ndarray] = None) -> Solution:
    """q*'s solution with each row's alpha by its rule (mixture.ALPHA_METHODS; None:
    kl_symmetry), clamped to [alpha_min, alpha_max] (B,) each: `alpha` (B,) for fixed rows (NaN
    elsewhere), `rule_alpha` for ess_balance and entropy, `solve`'s alpha* for kl_symmetry
    (its root clamped: log Z is convex, so that is the minimiser on the interval). The
    default rule with [0, 1] costs what `solve` costs; each other rule, its passes plus one
    evaluation at the chosen alpha."""
    n = rows.theta.shape[0]
    methods = np.array(["kl_symmetry"] * n if methods is None else methods)
    start = np.full(n, np.nan) if alpha is None else np.asarray(alpha, np.float64).copy()
    lo = np.zeros(n) if alpha_min is None else np.asarray(alpha_min, np.float64)
    hi = np.ones(n) if alpha_max is None else np.asarray(alpha_max, np.float64)
    fixed = ~np.isnan(start)
    for method in ("ess_balance", "entropy"):
        picked = methods == method
        if picked.any():
            index = torch.from_numpy(np.flatnonzero(picked)).to(rows.theta.device)
            start[picked] = rule_alpha(rows.take(index), method).cpu().numpy()
            fixed |= picked
    start = np.where(fixed, np.clip(start, lo, hi), np.nan)
    solution = solve(rows, start, fixed)
    solved = solution.alpha.cpu().numpy()
    clamped = np.clip(solved, lo, hi)
    if (clamped != solved).any():  # alpha* outside a row's interval: evaluate at the end
        solution = solve(rows, clamped, np.ones(n, dtype=bool))
    return solution


def solve_per_row(rows: Rows, rules: list[Any]) -> Solution:
    """`solve_rules` with row i's rule read from rules[i]: any object with `alpha` (None:
    by its rule), `alpha_method`, `alpha_min` and `alpha_max` (a fused request's TokenArgs,
    the speculative step's Request, the exact coordinator's settings)."""
    return solve_rules(rows, [r.alpha_method for r in rules],
                       np.array([np.nan if r.alpha is None else r.alpha for r in rules],
                                dtype=np.float64),
                       np.array([r.alpha_min for r in rules], dtype=np.float64),
                       np.array([r.alpha_max for r in rules], dtype=np.float64))


FIELDS = ("token",) + TOKEN_FIELDS  # what draw returns per row


def draw(rows: Rows, solution: Solution, mix: Mixture, seeds: np.ndarray, steps: np.ndarray,
         temperature: np.ndarray) -> dict[str, torch.Tensor]:
    """Each row's token and its exact diagnostics (FIELDS, (B,) each): the token from
    q*^(1/T) with the uniform of (seeds[i], steps[i]) (`uniforms`). The fused engine's
    sampler and the exact two-engine coordinator both draw through here, so at one seed
    they draw the same tokens from the same logits."""
    device = rows.theta.device
    u = torch.from_numpy(uniforms(seeds, steps)).to(device)
    tau = torch.as_tensor(np.asarray(temperature, dtype=np.float64), device=device)
    picked = sample(rows, solution, mix.log_z, u, tau)
    return fields(rows, solution, mix, picked.token, picked.logp_q)


def _inverse_cdf(rows: Rows, alpha: torch.Tensor, masses: torch.Tensor, u: torch.Tensor,
                 tau: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The first id (n,) where the CDF of the weights exp(tau (e - top)), e = log q* + log Z,
    exceeds u * total, never an id of weight 0; `masses` (n, nb) are their block sums
    (tau, top (n,): the tempering and the scale the masses were summed at)."""
    cdf = masses.double().cumsum(dim=-1)  # (n, nb)
    threshold = u.double()[:, None] * cdf[:, -1:]  # (n, 1)
    block = torch.searchsorted(cdf, threshold, right=True).clamp_(max=cdf.shape[-1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # (n, 1)
    width = rows.width
    columns = block * width + torch.arange(width, device=cdf.device)  # (n, width)
    weights = _BLOCK_WEIGHTS(rows.theta, rows.target, columns, rows.c_theta, rows.c_target,
                             alpha.double(), tau.double(), top.double())  # (n, width)
    inside = before + weights.cumsum(dim=-1)
    column = torch.searchsorted(inside, threshold, right=True)[:, 0]  # (n,)
    zero = column >= width
    zero |= weights.gather(1, column.clamp(max=width - 1)[:, None])[:, 0] <= 0
    if zero.any():  # rounding (the block's float32 mass against its float64 weights):
        positive = weights[zero] > 0  # the last positive weight up to there, else the first
        upto = positive & (torch.arange(width, device=cdf.device)[None, :] <= column[zero, None])
        last = width - 1 - upto.flip(-1).to(torch.int8).argmax(dim=-1)
        first = positive.to(torch.int8).argmax(dim=-1)
        column[zero] = torch.where(upto.any(dim=-1), last, first)
    return columns.gather(1, column[:, None])[:, 0]


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


def warm_up(vocab_size: int, device: torch.device | str = "cpu") -> None:
    """Compile every kernel for rows of `vocab_size` ids (a one-off at server start-up, so
    that no request waits for it: seconds, or a cache hit in torchinductor's cache)."""
    for batch in (1, 2):
        theta = torch.randn(batch, vocab_size, device=device)
        rows = Rows.of(theta, 0.5 * theta)
        solution = solve(rows)
        u = torch.full((batch,), 0.5, dtype=torch.float64, device=device)
        sample(rows, solution, solution.mixture().log_z, u,
               torch.full((batch,), 0.7, dtype=torch.float64, device=device))
