"""The fused server's logits processor: alpha*, q* and the token itself, every engine step.

vLLM runs it (`--logits-processors dual_sampling.vllm_plugin.fused_sampler:FusedSampler`,
set by start_vllm.sh --fused) on the logits of every step, after the composite model
(fused_model.py) has put both models' full-vocabulary log-softmax in the worker's stash.
Per row, from the request's `SamplingParams.extra_args[EXTRA_KEY]`:

    {"tag": str, "seed": int, "alpha": float | None, "temperature": float}

- alpha None solves alpha* (the Chernoff point, to 1e-7, warm-started at the row's previous
  alpha*); a number in [0, 1] fixes it for this request (a sweep needs no restart).
- A tagged row SAMPLES ITS TOKEN HERE: from q*^(1/T) normalised (T = temperature, 0 =
  argmax), by inverse CDF with one uniform from (seed, number of tokens generated so far)
  (fused_math.uniforms), so a request's tokens depend on its seed alone, not on batching,
  preemption or resume. The row's logits become 0 at that token and -inf elsewhere, so
  vLLM's own sampler picks it at any temperature, top-p or top-k. Its exact per-token
  diagnostics (token, alpha, logp_theta, logp_target, logp_q under the distribution
  sampled, KL(q*||theta), KL(q*||target), H(q*)) go to fused_state under the tag.
- A row without the extra args (a stock /v1/completions request) gets log q* with alpha*
  as its logits: vLLM then samples q* with the request's own temperature, seed, top-p.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from dual_sampling.vllm_plugin import fused_math, fused_state
from dual_sampling.vllm_plugin.fused_setup import EXTRA_KEY


@dataclass
class _Row:
    """One request in the persistent batch."""

    tag: Optional[str]
    seed: int
    alpha: Optional[float]
    temperature: float
    output_ids: list[int]  # vLLM's live list of the request's generated ids
    last_alpha: float = 0.5  # warm start of the next solve


_WORKSPACE = fused_math.Workspace()  # this worker's (R, V) buffers, reused step after step


def _read_args(params: SamplingParams) -> Optional[dict[str, Any]]:
    return (params.extra_args or {}).get(EXTRA_KEY)


class FusedSampler(LogitsProcessor):
    """See the module docstring. Inert on a server whose model is not the composite one."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = _read_args(sampling_params)
        if args is None:
            return
        alpha, temperature = args.get("alpha"), args.get("temperature", 1.0)
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"extra_args.{EXTRA_KEY}.alpha = {alpha!r}: give null (solve "
                             f"alpha* per token) or a number in [0, 1]")
        if not float(temperature) >= 0.0:
            raise ValueError(f"extra_args.{EXTRA_KEY}.temperature = {temperature!r}: must "
                             f"be >= 0 (0 = argmax of q*)")
        if not isinstance(args.get("tag"), str) or not isinstance(args.get("seed"), int):
            raise ValueError(f"extra_args.{EXTRA_KEY} needs a string `tag` and an integer "
                             f"`seed`, got {args!r}")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, _, output_ids in batch_update.added:
            self._drop(index)
            args = _read_args(params) or {}
            row = _Row(tag=args.get("tag"), seed=int(args.get("seed", 0)),
                       alpha=args.get("alpha"), temperature=float(args.get("temperature", 1.0)),
                       output_ids=output_ids)
            if row.tag is not None:
                fused_state.open_record(row.tag)
            self.rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b
            elif row_b is not None and row_b.tag is not None:
                fused_state.mark_removed(row_b.tag)

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None and row.tag is not None:
            fused_state.mark_removed(row.tag)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        stash = fused_state.take_logprobs()
        if not self.rows or stash is None or stash[0].shape[0] != logits.shape[0]:
            return logits  # a dummy or warm-up run: no requests, or no forward behind it
        t0 = time.perf_counter()
        index = sorted(i for i in self.rows if i < logits.shape[0])
        states = [self.rows[i] for i in index]
        device = logits.device
        idx = torch.tensor(index, device=device)
        if index == list(range(len(index))):  # the usual case: views, not copies of (R, V)
            rows = fused_math.Rows.of(stash[0][:len(index)], stash[1][:len(index)], _WORKSPACE)
        else:
            rows = fused_math.Rows.of(stash[0][idx], stash[1][idx], _WORKSPACE)  # (R, K)
        alpha = torch.tensor([np.nan if r.alpha is None else r.alpha for r in states],
                             dtype=torch.float64, device=device)  # (R,)
        solve = torch.isnan(alpha)
        evaluations = 0
        s0 = time.perf_counter()
        if solve.all():
            start = np.array([r.last_alpha for r in states])
            alpha, evaluations = fused_math.solve_alpha(rows, start)
        elif solve.any():
            start = np.array([r.last_alpha for r in states])[solve.cpu().numpy()]
            alpha[solve], evaluations = fused_math.solve_alpha(rows.take(solve), start)
        solve_s = time.perf_counter() - s0
        mix = fused_math.Mixture.at(rows, alpha)
        tagged = torch.tensor([r.tag is not None for r in states], device=device)
        if not tagged.all():
            plain = ~tagged
            log_q = rows.take(plain).scatter(mix.log_q(rows, alpha)[plain], logits.shape[1])
            logits[idx[plain]] = log_q.to(logits.dtype)
        if tagged.any():
            self._sample(logits, idx, states, tagged, rows, alpha, mix)
        for state, value in zip(states, alpha.tolist()):
            state.last_alpha = value
        fused_state.count(len(states), solve_s, time.perf_counter() - t0, evaluations)
        return logits

    def _sample(self, logits: torch.Tensor, idx: torch.Tensor, states: list[_Row],
                tagged: torch.Tensor, rows: fused_math.Rows, alpha: torch.Tensor,
                mix: fused_math.Mixture) -> None:
        """Draw each tagged row's token, force it in `logits`, record its diagnostics."""
        picked = [state for state in states if state.tag is not None]
        seeds = np.array([r.seed for r in picked], dtype=np.uint64)
        steps = np.array([len(r.output_ids) for r in picked], dtype=np.uint64)
        u = torch.from_numpy(fused_math.uniforms(seeds, steps)).to(logits.device)  # (T,)
        temperature = torch.tensor([r.temperature for r in picked], dtype=torch.float64,
                                   device=logits.device)  # (T,)
        every = bool(tagged.all())  # the usual case: no copies of the (T, K) rows

        def of_tagged(x: torch.Tensor) -> torch.Tensor:
            return x if every else x[tagged]

        rows_t = rows if every else rows.take(tagged)
        alpha_t, log_z = of_tagged(alpha), of_tagged(mix.log_z)
        if (temperature == 1.0).all():  # q* itself: sample its unnormalised weights
            column = fused_math.inverse_cdf(of_tagged(mix.weights), u)  # (T,)
            logp_theta, d = rows_t.at(column)
            logp_q = logp_theta + alpha_t * d - log_z
        else:
            log_sampled = fused_math.tempered(mix.log_q(rows_t, alpha_t), temperature)
            column = fused_math.inverse_cdf(log_sampled.exp(), u)  # (T,)
            logp_theta, d = rows_t.at(column)
            logp_q = log_sampled.gather(1, column[:, None])[:, 0].double()
        token = rows_t.token(column)  # (T,) vocabulary ids
        target_rows = idx[tagged]
        logits.index_fill_(0, target_rows, -torch.inf)
        logits[target_rows, token] = 0.0
        columns = {
            "token": token, "alpha": alpha_t, "logp_theta": logp_theta,
            "logp_target": logp_theta + d, "logp_q": logp_q,
            "kl_q_theta": of_tagged(mix.kl_q_theta), "kl_q_target": of_tagged(mix.kl_q_target),
            "entropy_q": of_tagged(mix.entropy_q)}
        fused_state.put([r.tag for r in picked], steps.tolist(),
                        {name: value.tolist() for name, value in columns.items()})
