"""The fused transport's math in torch, on the logits' device: alpha*, q*, sampling, diagnostics.

The torch twin of dual_sampling/mixture.py for full-vocabulary rows (the numpy module stays
the reference; tests/test_fused_math.py checks one against the other). Natural logs, nats.

    rows = Rows.of(logp_theta, logp_target)        # (B, V) log-softmaxes; -inf = padding
    alpha, evaluations = solve_alpha(rows, start)  # (B,)
    mix = Mixture.at(rows, alpha)                  # q* unnormalised, log Z, KLs, entropy
    column = inverse_cdf(mix.weights, uniforms(seeds, steps))
    token = rows.token(column)                     # vocabulary ids

Over the full vocabulary both models are finite on every real id, so g(alpha) = (log Z)'
= E_q[d], d = logp_target - logp_theta, runs from g(0) = -KL(theta||target) <= 0 to
g(1) = KL(target||theta) >= 0: alpha* is the root of g in [0, 1], and [0, 1] brackets it
from the start. Identical rows (g = 0 everywhere) give alpha* = 0.5, as in mixture.py.

Speed is the point here (this runs every engine step over B x V, V up to 151,936):

- **Pruned support.** With L = max_x min(logp_theta(x), logp_target(x)), every alpha in
  [0, 1] has Z(alpha) >= exp(L) (the term of that x), and an id with both logprobs below
  L - PRUNE_NATS has weight exp((1-alpha) logp_theta + alpha logp_target) < exp(L - PRUNE_NATS):
  all such ids together hold less than V exp(-PRUNE_NATS) of Z (6.4e-13 at V = 151,936),
  at every alpha. `Rows.of` drops them when that shrinks the rows by half or more (peaked
  models), gathering the rest into compact (B, K) rows in float64 (cheap at small K);
  otherwise (flat rows, as real LMs' long tails are) it keeps all V columns in the input's
  dtype, float32 in the engine: no float64 copy of the rows, ever.
- **Few passes.** The rows are a = logp_theta, a / ln 2 and d (B, K); one evaluation of
  g, g', g'' at alpha is w = exp2(a / ln 2 + alpha d / ln 2) (exp2 costs a third of exp on
  CPU), then w d, w d^2, w d^3 in one buffer and four cascade row sums (~1e-7 relative at
  V = 151,936), all in reused buffers (`Workspace`: no fresh (B, V) tensor per step). The
  solver (safeguarded Chebyshev, warm-started) needs two or three evaluations, and the
  diagnostics come from one more: KL(q||theta) = alpha E[d] - log Z,
  KL(q||target) = (alpha - 1) E[d] - log Z, H(q) = log Z - E[a] - alpha E[d].
- **Blocked inverse CDF.** The token is found from per-block sums (float64 over the blocks)
  and one block's cumulative sum, not a cumulative sum over V.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

TOL = 1e-7  # alpha; see solve_alpha for the stopping rule
MAX_ITER = 60
PRUNE_NATS = 40.0  # ids with both logprobs below L - PRUNE_NATS are dropped (module docstring)
COMPACT_SHARE = 0.5  # prune only when the kept columns are at most this share of V
PRUNE_SAMPLE = 2048  # columns sampled to decide whether to try pruning
CDF_BLOCK = 1024  # columns per block of the inverse CDF
_LOG2E = 1.0 / np.log(2.0)
_FLAT_VAR = 1e-14  # Var_q[d] below this: the two rows are the same distribution


class Workspace:
    """Reusable buffers for a caller that runs step after step (the engine's processor).

    On CPU a fresh (B, V) tensor costs a page fault per 4 KiB, more than the pass that
    fills it; a tensor handed out stays valid until its name is asked for again."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        size = int(np.prod(shape))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype \
                or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(size, dtype=like.dtype,
                                                       device=like.device)
        return buffer[:size].view(shape)


def _empty(workspace: Optional[Workspace], name: str, shape: tuple[int, ...],
           like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return workspace.get(name, shape, like)


def neglected_mass_bound(vocab_size: int) -> float:
    """Upper bound on the share of Z(alpha), any alpha in [0, 1], held by pruned ids."""
    return vocab_size * float(np.exp(-PRUNE_NATS))


class Rows(NamedTuple):
    """A batch of (theta, target) next-token rows in the form the solver uses."""

    a: torch.Tensor  # (B, K) logp_theta on the shared support, -inf off it
    d: torch.Tensor  # (B, K) logp_target - logp_theta on the shared support, 0 off it
    a_log2: torch.Tensor  # (B, K) a / ln 2: exp(a + alpha d) = exp2(a_log2 + alpha d / ln 2),
    #                       and exp2 costs a third of exp on CPU
    spread: torch.Tensor  # (B,) max d - min d over the support, float64
    columns: Optional[torch.Tensor]  # (B, K) vocabulary id of each column; None: column = id
    everywhere: bool  # every column is on the shared support (no -inf in a)
    workspace: Optional[Workspace] = None  # where the (B, K) work tensors live

    @classmethod
    def of(cls, logp_theta: torch.Tensor, logp_target: torch.Tensor,
           workspace: Optional[Workspace] = None) -> "Rows":
        """From normalised log-probabilities (B, V), float32 or float64, -inf on padded ids.
        Computes in the input's dtype over all V columns (less a padded suffix), or in
        float64 over the pruned support when that is at most COMPACT_SHARE of V (see the
        module docstring). With a `workspace`, the rows and every (B, K) tensor computed
        from them (weights included) live in its buffers until its next use."""
        a, b = _without_padded_suffix(logp_theta, logp_target)
        columns = None
        keep = _pruned_support(a, b)  # (B, V) bool, or None: keep everything
        if keep is not None:
            a, b, columns = _gather(keep, a, b)
        d = torch.sub(b, a, out=_empty(workspace, "d", a.shape, a))  # (B, K)
        low, high = d.amin(dim=-1), d.amax(dim=-1)  # (two passes beat one aminmax on CPU)
        everywhere = bool(torch.isfinite(low).all() & torch.isfinite(high).all())
        if not everywhere:  # padded or pruned ids inside the rows: off the shared support
            shared = torch.isfinite(a) & torch.isfinite(b)  # (B, K)
            d = torch.where(shared, d, 0.0)
            a = torch.where(shared, a, -torch.inf)
            low = torch.where(shared, d, torch.inf).amin(dim=-1)
            high = torch.where(shared, d, -torch.inf).amax(dim=-1)
        a_log2 = torch.mul(a, _LOG2E, out=_empty(workspace, "a_log2", a.shape, a))
        return cls(a, d, a_log2, (high - low).double(), columns, everywhere, workspace)

    def take(self, index: torch.Tensor) -> "Rows":
        return Rows(self.a[index], self.d[index], self.a_log2[index], self.spread[index],
                    None if self.columns is None else self.columns[index], self.everywhere,
                    self.workspace)

    def token(self, column: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (n,) of per-row column indices (n,)."""
        if self.columns is None:
            return column
        return self.columns.gather(1, column[:, None])[:, 0]

    def at(self, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp_theta, d) (n,) at per-row column indices (n,), float64."""
        at = column[:, None]
        return self.a.gather(1, at)[:, 0].double(), self.d.gather(1, at)[:, 0].double()

    def scatter(self, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Per-column values (n, K) as full rows (n, vocab_size), -inf on pruned and padded ids."""
        if self.columns is None and values.shape[1] == vocab_size:
            return values
        full = torch.full((values.shape[0], vocab_size), -torch.inf, dtype=values.dtype,
                          device=values.device)
        if self.columns is None:
            full[:, :values.shape[1]] = values
            return full
        return full.scatter_(1, self.columns, values)


def _without_padded_suffix(a: torch.Tensor, b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a and b (B, V) without the trailing columns that are -inf in every row of
    either (a checkpoint's padded output rows): they carry no mass and cost passes."""
    if bool(torch.isfinite(a[:, -1]).all() & torch.isfinite(b[:, -1]).all()):
        return a, b
    finite = torch.isfinite(a[0]) & torch.isfinite(b[0])  # (V,)
    width = int(finite.nonzero().max().item()) + 1 if bool(finite.any()) else a.shape[1]
    tail_a, tail_b = a[:, width:], b[:, width:]
    if bool((torch.isinf(tail_a) | torch.isinf(tail_b)).all()):
        return a[:, :width], b[:, :width]
    return a, b


def _pruned_support(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """The ids to keep (B, V) bool, or None when pruning would keep more than COMPACT_SHARE.

    Whether to try is guessed from a strided sample of PRUNE_SAMPLE columns (a wrong guess
    costs speed, never exactness: keeping every id is always exact); the cut itself uses
    the exact L over all ids."""
    vocab = a.shape[-1]
    stride = max(1, vocab // PRUNE_SAMPLE)
    a_seen, b_seen = a[:, ::stride], b[:, ::stride]  # (B, ~PRUNE_SAMPLE)
    cut_seen = torch.minimum(a_seen, b_seen).amax(dim=-1, keepdim=True) - PRUNE_NATS
    if (torch.maximum(a_seen, b_seen) < cut_seen).sum(dim=-1).min().item() \
            < (1 - COMPACT_SHARE) * a_seen.shape[1]:
        return None  # real LMs' usual case: their long tails sit within 40 nats
    floor = torch.minimum(a, b).amax(dim=-1)  # (B,) L
    keep = torch.maximum(a, b) >= (floor - PRUNE_NATS)[:, None]  # (B, V)
    if keep.sum(dim=-1).max().item() > COMPACT_SHARE * vocab:
        return None
    return keep


def _gather(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept ids of each row, in id order, as compact float64 rows (B, K): logp_theta and
    logp_target (-inf in the padding past a row's count), and the ids (0 in the padding)."""
    counts = keep.sum(dim=-1)  # (B,)
    width = int(counts.max().item())
    row, column = keep.nonzero(as_tuple=True)  # (N,) each, row-major
    starts = counts.cumsum(0) - counts  # (B,)
    slot = torch.arange(row.shape[0], device=row.device) - starts[row]  # (N,)
    columns = torch.zeros((a.shape[0], width), dtype=torch.int64, device=a.device)
    columns[row, slot] = column
    compact = []
    for x in (a, b):
        out = torch.full((a.shape[0], width), -torch.inf, dtype=torch.float64, device=a.device)
        out[row, slot] = x[row, column].double()
        compact.append(out)
    return compact[0], compact[1], columns


def _moments(rows: Rows, alpha: torch.Tensor, name: str = "w", order: int = 3
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w = exp(a + alpha d) (n, K) (q* unnormalised; log Z <= 0, so no overflow) and
    their moments (n, order + 1) float64: sum w, sum w d, ..., sum w d^order.

    Elementwise products and torch's row sums (cascade summation: float32 partials stay
    short, ~1e-7 relative at V = 151,936), not a matrix product: BLAS accumulates a long
    float32 dot product in a few registers, and lost 3e-4 of sum w d^k at that size."""
    w = _empty(rows.workspace, name, rows.a.shape, rows.a)
    scaled = (alpha * _LOG2E).to(rows.a)[:, None]  # (n, 1)
    torch.addcmul(rows.a_log2, rows.d, scaled, out=w).exp2_()  # (n, K)
    power = torch.mul(w, rows.d, out=_empty(rows.workspace, "w_d", rows.a.shape, rows.a))
    sums = [w.sum(dim=-1), power.sum(dim=-1)]
    for _ in range(order - 1):
        sums.append(power.mul_(rows.d).sum(dim=-1))
    return w, torch.stack(sums, dim=-1).double()


def solve_alpha(rows: Rows, start: np.ndarray | None = None, tol: float = TOL
                ) -> tuple[torch.Tensor, int]:
    """alpha* per row (B,) float64 (the Chernoff point), and the number of evaluations of g.

    `start` (B,) in [0, 1] is a warm start (e.g. the row's alpha* at its previous token);
    0.5 by default.

    Safeguarded Chebyshev (third-order Newton) on the convex log Z: each evaluation gives,
    for the rows still running, g = E_q[d], g' = Var_q[d] and g'' = the third central
    moment, all from one pass (`_moments`); the bracket [lo, hi] keeps g(lo) < 0 < g(hi).
    The step s = -g/g' - g'' g^2 / (2 g'^3) is taken when it lands inside the bracket and
    its cubic term is at most a quarter of the Newton step -g/g', the Newton step when that
    lands inside, else the bracket is bisected. A row stops, taking its
    step, once the step's estimated error is below tol: (g''/g')^2 |s|^3 for a Chebyshev
    step (cubic convergence), |g''/2g'| s^2 for a Newton step, with the spread max d - min d
    (>= |g''/g'|) for g''/g', or the bracket's width. The few per-row scalars live in
    numpy: one (n, 4) copy from the device per evaluation.
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
        correction = -0.5 * curve * newton * newton
        cheb = newton + correction
        # the cubic term must be a correction: far from the root it can cancel the Newton
        # step (and its error estimate with it), stopping a row at a wrong alpha
        use_cheb = ((np.abs(correction) <= 0.25 * np.abs(newton))
                    & (x + cheb > lo) & (x + cheb < hi))
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

    weights: torch.Tensor  # (B, K) q* * Z, in the rows' dtype
    log_z: torch.Tensor  # (B,) float64
    kl_q_theta: torch.Tensor  # (B,) nats, float64
    kl_q_target: torch.Tensor  # (B,)
    entropy_q: torch.Tensor  # (B,)

    @classmethod
    def at(cls, rows: Rows, alpha: torch.Tensor) -> "Mixture":
        alpha = alpha.double()
        w, m = _moments(rows, alpha, name="weights", order=1)
        w_a = torch.mul(w, rows.a, out=_empty(rows.workspace, "w_d", w.shape, w))
        if not rows.everywhere:
            w_a.nan_to_num_(nan=0.0)  # 0 * -inf off the support
        sum_wa = w_a.sum(dim=-1).double()  # (B,)
        log_z = m[:, 0].log()
        mean_d, mean_a = m[:, 1] / m[:, 0], sum_wa / m[:, 0]
        return cls(w, log_z, alpha * mean_d - log_z, (alpha - 1) * mean_d - log_z,
                   log_z - mean_a - alpha * mean_d)

    def log_q(self, rows: Rows, alpha: torch.Tensor) -> torch.Tensor:
        """Normalised log q* (B, K) in the rows' dtype; -inf off the shared support."""
        return (torch.addcmul(rows.a, rows.d, alpha.to(rows.a)[:, None])
                - self.log_z.to(rows.a)[:, None])


def tempered(log_q: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log of q^(1/T) normalised, (B, K); a row with T <= 0 is the point mass on its argmax."""
    greedy = temperature <= 0  # (B,)
    scaled = log_q / torch.where(greedy, 1.0, temperature.to(log_q))[:, None]  # (B, K)
    log_qt = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    if greedy.any():
        point = torch.full_like(log_q[greedy], -torch.inf)
        point.scatter_(1, log_q[greedy].argmax(dim=-1, keepdim=True), 0.0)
        log_qt[greedy] = point
    return log_qt


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index (B,) int64 where the CDF of the weights (B, K) (unnormalised q, >= 0)
    exceeds u * total; never an index of weight 0.

    Rows wider than CDF_BLOCK go in two levels: the sums of blocks of CDF_BLOCK columns
    (accumulated over the blocks in float64) pick the block, one block's cumulative sum
    the column; narrower rows take one float64 cumulative sum."""
    n_rows, width = weights.shape
    if width <= CDF_BLOCK:
        cdf = weights.double().cumsum(dim=-1)  # (B, K)
        threshold = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
        offset = torch.zeros_like(threshold, dtype=torch.int64)
    else:
        full = width // CDF_BLOCK * CDF_BLOCK
        blocks = [weights[:, :full].reshape(n_rows, -1, CDF_BLOCK).sum(dim=-1)]  # (B, nb)
        if full < width:
            blocks.append(weights[:, full:].sum(dim=-1, keepdim=True))
        block_cdf = torch.cat(blocks, dim=-1).double().cumsum(dim=-1)  # (B, nb)
        threshold = uniforms.to(block_cdf)[:, None] * block_cdf[:, -1:]  # (B, 1)
        block = torch.searchsorted(block_cdf, threshold, right=True)
        block = block.clamp_(max=block_cdf.shape[-1] - 1)  # (B, 1)
        before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
        offset = block * CDF_BLOCK  # (B, 1)
        index = offset + torch.arange(CDF_BLOCK, device=weights.device)  # (B, CDF_BLOCK)
        inside = weights.gather(1, index.clamp(max=width - 1)).double()
        inside.masked_fill_(index >= width, 0.0)
        cdf = before + inside.cumsum(dim=-1)  # (B, CDF_BLOCK)
    column = torch.searchsorted(cdf, threshold, right=True).clamp_(max=cdf.shape[-1] - 1)
    idx = (offset + column)[:, 0]
    zero = weights.gather(1, idx[:, None].clamp(max=width - 1))[:, 0] <= 0
    zero |= idx >= width
    if zero.any():  # u * total rounded up past a block's end: the last positive entry before
        upto = torch.arange(width, device=weights.device)[None, :] <= idx[zero, None]
        positive = (weights[zero] > 0) & upto
        fallback = positive.any(dim=-1)
        last = width - 1 - positive.flip(-1).to(torch.int8).argmax(dim=-1)
        first = (weights[zero] > 0).to(torch.int8).argmax(dim=-1)
        idx[zero] = torch.where(fallback, last, first)
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
