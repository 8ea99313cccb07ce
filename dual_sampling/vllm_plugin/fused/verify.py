"""One speculative verify step of the fused engine, as math on the step's logits (no vLLM):
solve (alpha by each request's rule and q*'s moments at every verified row, maths/kernels.py),
accept (each draft x with probability min(1, q(x) / p(x)), vectorised over requests),
draw (each request's fresh token: the bonus from q by the non-speculative engine's own
inverse CDF, or the residual norm(max(0, q - p)) after its first rejection) and record
(kernels.FIELDS of every emitted token). Whole rows of q are materialised only where a
step needs them: a residual, a stock request's top_k / top_p, T = 0's argmax and
processed logprobs. fused/speculate.py runs it inside vLLM; its docstring says why the
draws are exact, and tests/test_speculate.py checks them against closed forms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from dual_sampling.maths import kernels

STREAM_DRAFT, STREAM_ACCEPT = 1, 2  # stream 0: the token itself (bonus, residual, K = 0)
_STREAM_MIX = np.uint64(0xD1B54A32D192ED03)


def stream_uniforms(seeds: np.ndarray, steps: np.ndarray, stream: int) -> np.ndarray:
    """kernels.uniforms on an independent stream of (seed, step)."""
    with np.errstate(over="ignore"):
        mixed = seeds.astype(np.uint64) ^ (np.uint64(stream) * _STREAM_MIX)
    return kernels.uniforms(mixed, steps)


@dataclass
class Request:
    """One request of the step, as this module reads it from vLLM's batch."""

    tag: Optional[str]
    seed: int
    alpha: Optional[float]
    temperature: float
    position: int  # position in the completion of the first token this step emits
    drafts: int  # draft tokens to verify this step
    top_k: int = 0  # a stock request's restrictions of q (vLLM's meaning; these: none)
    top_p: float = 1.0
    alpha_method: str = "kl_symmetry"  # kernels.solve_rules, as the non-speculative engine
    alpha_min: float = 0.0
    alpha_max: float = 1.0



def tempered_log_q(log_q: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log of q^(1/T) normalised per row (T > 0; rows at T = 1 unchanged, T = 0 left as is)."""
    scale = torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-30), 1.0).double()
    if bool((scale == 1.0).all()):
        return log_q
    return torch.log_softmax(log_q * scale[:, None], dim=-1)


def truncate(log_q: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """log q (R, V), normalised, restricted per row as vLLM's sampler restricts a request's
    distribution after its temperature, and normalised again: top_k keeps the k largest
    ids, then top_p the largest while the mass before them (among those) is below p. Off:
    top_k <= 0 or >= V, top_p >= 1; rows with neither are returned untouched."""
    vocab = log_q.shape[1]
    use_k, use_p = (top_k > 0) & (top_k < vocab), top_p < 1.0  # (R,)
    need = use_k | use_p
    if not bool(need.any()):
        return log_q
    ordered, order = log_q[need].sort(dim=-1, descending=True)  # (S, V)
    rank = torch.arange(vocab, device=log_q.device)[None, :]
    keep = ~use_k[need, None] | (rank < top_k[need, None])
    mass = torch.softmax(ordered.masked_fill(~keep, -torch.inf), dim=-1)
    keep &= ~use_p[need, None] | (mass.cumsum(dim=-1) - mass < top_p[need, None].to(mass.dtype))
    keep |= rank == 0  # the largest id always stays
    kept = ordered.masked_fill(~keep, -torch.inf)
    out = log_q.clone()
    out[need] = torch.log_softmax(torch.empty_like(kept).scatter_(1, order, kept), dim=-1)
    return out


@dataclass
class Batch:
    """The verify step's rows, request-major (a request's `drafts` draft rows, then the row
    whose token is drawn afresh), as numpy bookkeeping and per-row tensors."""

    requests: list[Request]
    starts: np.ndarray  # (n,) each request's first row
    row_req: np.ndarray  # (R,) each row's request
    offset: np.ndarray  # (R,) the row's place in its request
    is_draft: np.ndarray  # (R,) bool: a draft row (its token is a draft to test)
    drafts: np.ndarray  # (n,) each request's draft tokens
    seeds: np.ndarray  # (R,) uint64
    positions: np.ndarray  # (R,) the row's position in the completion
    temperature: torch.Tensor  # (R,) float64
    truncated: torch.Tensor  # (R,) bool: a stock request restricts q (top_k / top_p)

    @classmethod
    def of(cls, requests: list[Request], device: torch.device) -> "Batch":
        counts = np.array([r.drafts + 1 for r in requests])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        row_req = np.repeat(np.arange(len(requests)), counts)
        offset = np.arange(len(row_req)) - starts[row_req]

        def per_row(name: str, dtype: Any) -> np.ndarray:
            return np.array([getattr(requests[i], name) for i in row_req], dtype=dtype)

        top_k, top_p = per_row("top_k", np.int64), per_row("top_p", np.float64)
        return cls(requests, starts, row_req, offset, offset < counts[row_req] - 1,
                   counts - 1, per_row("seed", np.uint64), per_row("position", np.int64) + offset,
                   torch.from_numpy(per_row("temperature", np.float64)).to(device),
                   torch.from_numpy(((top_k > 0) & (top_k < 1 << 62)) | (top_p < 1.0))
                   .to(device))

    def limits(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k, top_p) of the rows at `index`, as `truncate` takes them."""
        rows = self.row_req[index.cpu().numpy()]
        return (torch.tensor([self.requests[i].top_k for i in rows], device=index.device),
                torch.tensor([self.requests[i].top_p for i in rows], device=index.device))


@dataclass
class Step:
    """One verify step's result: per request the emitted ids and their rows, diagnostics."""

    tokens: list[list[int]]
    rows: list[list[int]]  # logits row each emitted token was drawn at
    accepted: int  # draft tokens accepted, over the batch
    proposed: int
    dense_log_q: Any  # (index (m,) of rows) -> (m, V) log of the q those rows sampled from
    seconds: dict[str, float]  # the step's parts: solve, accept, draw, record
    solver_evaluations: int = 0


class _Q:
    """q at the step's rows, q*^(1/T) normalised (restricted for a stock request's top_k /
    top_p): log q at given (row, id) pairs without materialising a row, and whole rows only
    where they are needed (a residual, a restricted q, T = 0's argmax, processed logprobs)."""

    def __init__(self, rows: kernels.Rows, solution: kernels.Solution, mix: kernels.Mixture,
                 batch: Batch) -> None:
        self.rows, self.solution, self.mix, self.batch = rows, solution, mix, batch

    def dense(self, index: torch.Tensor) -> torch.Tensor:
        """(m, V) float64 log q of the rows at `index`."""
        part = self.rows.take(index)
        log_q = tempered_log_q(part.log_q(self.solution.alpha[index], self.mix.log_z[index]),
                               self.batch.temperature[index])
        if bool(self.batch.truncated[index].any()):
            log_q = truncate(log_q, *self.batch.limits(index))
        return log_q

    def at(self, index: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(m,) float64 log q at per-row ids (0 at T = 0, as the records have it)."""
        out = kernels.log_q_at(self.rows, self.solution, self.mix.log_z, index, token,
                               self.batch.temperature[index])
        cut = self.batch.truncated[index] & (self.batch.temperature[index] > 0)
        if bool(cut.any()):
            out[cut] = self.dense(index[cut]).gather(1, token[cut, None])[:, 0]
        return out

    def argmax(self, index: torch.Tensor) -> torch.Tensor:
        """(m,) q*'s argmax at those rows (T = 0's token; no restriction changes it)."""
        return self.rows.take(index).exponents(self.solution.alpha[index]).argmax(dim=-1)


def _draft_p(q: "_Q", batch: Batch, draft_rows: torch.Tensor,
             draft_probs: Optional[torch.Tensor], which: torch.Tensor,
             token: Optional[torch.Tensor]) -> torch.Tensor:
    """The draft's p (theta^(1/T) normalised) at drafts `which` (indices into the D drafts):
    at their ids `token` (m,), or whole rows (m, V) when `token` is None. From the draft's
    own probabilities where vLLM kept them (a gather), else from theta's logits at the
    verified rows (the same model): at T = 1 a gather and the normaliser the solve already
    has (no pass, no copy), at other T one pass over those rows."""
    theta = q.rows.theta
    vocab = theta.shape[1]
    if draft_probs is not None:
        if token is not None:
            return draft_probs[which, token].double()
        return draft_probs[which, :vocab].double()
    rows = draft_rows[which]
    temperature = batch.temperature[rows]
    if token is not None and bool((temperature == 1.0).all()):
        return q.rows.at(token, rows)[0].exp()
    log_p = tempered_log_q(torch.log_softmax(theta[rows].double(), dim=-1), temperature)
    return log_p.exp() if token is None else log_p.gather(1, token[:, None])[:, 0].exp()


def verify(theta: torch.Tensor, target: torch.Tensor, requests: list[Request],
           draft_ids: torch.Tensor, draft_probs: Optional[torch.Tensor]
           ) -> tuple[Step, dict[str, list]]:
    """Speculative sampling of one step in four parts: solve (alpha and q*'s moments at
    every row), accept (each draft against min(1, q/p)), draw (each request's fresh token:
    the bonus from q, or the residual after its first rejection) and record (FIELDS of every
    emitted token). theta/target: (R, V) logits of the verified rows, request-major;
    draft_ids (D,) in that order; draft_probs (D, >= V) the draft's p (None: from theta's
    logits, the same model). Returns the emitted tokens and the diagnostics columns of
    kernels.FIELDS for every emitted token, in emission order."""
    device = theta.device
    batch = Batch.of(requests, device)
    seconds = {}
    t0 = time.perf_counter()
    rows = kernels.Rows.of(theta, target)
    solution = kernels.solve_per_row(rows, [requests[i] for i in batch.row_req])
    q = _Q(rows, solution, solution.mixture(), batch)
    t1 = time.perf_counter()
    seconds["solve"] = t1 - t0
    draft_rows = torch.from_numpy(np.flatnonzero(batch.is_draft)).to(device)
    x = draft_ids.to(device=device, dtype=torch.int64)
    n_accept = _accepted(q, batch, draft_rows, x, draft_probs)
    t2 = time.perf_counter()
    seconds["accept"] = t2 - t1
    fresh = _draw(q, batch, draft_rows, draft_probs, n_accept)
    t3 = time.perf_counter()
    seconds["draw"] = t3 - t2
    tokens, emitted = _emitted(batch, x, n_accept, fresh)
    flat_rows = torch.tensor([j for rs in emitted for j in rs], dtype=torch.int64, device=device)
    flat_tokens = torch.tensor([t for ts in tokens for t in ts], dtype=torch.int64,
                               device=device)
    columns = kernels.fields(rows, solution, q.mix, flat_tokens, q.at(flat_rows, flat_tokens),
                             index=flat_rows)
    record = {name: value.tolist() for name, value in columns.items()}
    seconds["record"] = time.perf_counter() - t3
    step = Step(tokens, emitted, int(n_accept.sum()), int(sum(r.drafts for r in requests)),
                q.dense, seconds, solution.evaluations)
    return step, record


def _accepted(q: _Q, batch: Batch, draft_rows: torch.Tensor, x: torch.Tensor,
              draft_probs: Optional[torch.Tensor]) -> np.ndarray:
    """(n,) drafts accepted per request: each draft x at its row with probability
    min(1, q(x) / p(x)) (at T = 0: iff x is q*'s argmax), up to the first rejection."""
    n = len(batch.requests)
    if not len(draft_rows):
        return np.zeros(n, dtype=np.int64)
    vocab = q.rows.theta.shape[1]
    in_vocab = x < vocab
    xs = x.clamp(max=vocab - 1)
    greedy = batch.temperature[draft_rows] <= 0
    every = torch.arange(len(draft_rows), device=x.device)
    q_x = q.at(draft_rows, xs).exp()
    p_x = _draft_p(q, batch, draft_rows, draft_probs, every, xs)
    u = torch.from_numpy(stream_uniforms(batch.seeds[batch.is_draft],
                                         batch.positions[batch.is_draft],
                                         STREAM_ACCEPT)).to(x.device)
    accept = in_vocab & (u * p_x < q_x)
    if bool(greedy.any()):
        accept[greedy] = in_vocab[greedy] & (xs[greedy] == q.argmax(draft_rows[greedy]))
    # per request: the first rejected draft's place, else all its drafts (vectorised)
    owner = batch.row_req[batch.is_draft]
    place = batch.offset[batch.is_draft]
    n_accept = batch.drafts.copy()
    rejected = ~accept.cpu().numpy()
    np.minimum.at(n_accept, owner[rejected], place[rejected])
    return n_accept


def _draw(q: _Q, batch: Batch, draft_rows: torch.Tensor,
          draft_probs: Optional[torch.Tensor], n_accept: np.ndarray) -> torch.Tensor:
    """(n,) each request's fresh token at its last row (after its accepted drafts): the
    residual norm(max(0, q - p)) where a draft was rejected, else q itself (the
    bonus) by the non-speculative engine's own inverse CDF (kernels.sample, no row
    materialised); T = 0: q*'s argmax."""
    device = q.rows.theta.device
    last_np = batch.starts + n_accept
    last = torch.from_numpy(last_np).to(device)
    u = torch.from_numpy(kernels.uniforms(batch.seeds[last_np], batch.positions[last_np])
                         ).to(device)
    temperature = batch.temperature[last]
    greedy = temperature <= 0
    rejected = torch.from_numpy(n_accept < batch.drafts).to(device) & ~greedy
    dense = (rejected | batch.truncated[last]) & ~greedy
    plain = ~dense & ~greedy
    fresh = torch.empty(len(last), dtype=torch.int64, device=device)
    if bool(plain.any()):
        at = last[plain]
        fresh[plain] = kernels.sample(q.rows.take(at), q.solution.take(at), q.mix.log_z[at],
                                      u[plain], temperature[plain]).token
    if bool(dense.any()):
        at = last[dense]
        weights = q.dense(at).exp()
        cut = rejected[dense]
        if bool(cut.any()):  # the residual at the first rejected draft's row
            draft_index = torch.from_numpy(
                np.searchsorted(np.flatnonzero(batch.is_draft), at[cut].cpu().numpy())
            ).to(device)
            residual = (weights[cut] - _draft_p(q, batch, draft_rows, draft_probs,
                                                draft_index, None)).clamp_(min=0.0)
            empty = residual.sum(dim=-1) <= 0  # q == p there: never rejected, kept for safety
            weights[cut] = torch.where(empty[:, None], weights[cut], residual)
        fresh[dense] = kernels.inverse_cdf(weights, u[dense])
    if bool(greedy.any()):
        fresh[greedy] = q.argmax(last[greedy])
    return fresh


def _emitted(batch: Batch, x: torch.Tensor, n_accept: np.ndarray, fresh: torch.Tensor
             ) -> tuple[list[list[int]], list[list[int]]]:
    """Per request: its accepted drafts then its fresh token, and the row of each."""
    xs = x.cpu().numpy() if len(x) else np.zeros(0, dtype=np.int64)
    fresh_np = fresh.cpu().numpy()
    tokens, rows, d = [], [], 0
    for i, r in enumerate(batch.requests):
        a = int(n_accept[i])
        tokens.append([int(t) for t in xs[d:d + a]] + [int(fresh_np[i])])
        rows.append(list(range(int(batch.starts[i]), int(batch.starts[i]) + a + 1)))
        d += r.drafts
    return tokens, rows
