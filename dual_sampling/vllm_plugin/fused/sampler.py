"""The fused server's logits processor: alpha*, q* and the token itself, every engine step.

vLLM runs it (`--logits-processors dual_sampling.vllm_plugin.fused.sampler:FusedSampler`,
set by start_vllm.sh --fused) on the logits of every step, after the composite model
(fused/model.py) has put both models' full-vocabulary logits in the worker's stash; the
math (maths/kernels.py: a few fused passes over the vocabulary, compiled at start-up) reads
them in place, before this step's writes to theta's logits.
Per row, the request's `fused_format.TokenArgs` (its `SamplingParams.extra_args`): a tag,
a seed, alpha (None: by its alpha rule), a temperature and the rule with its clamps.

- alpha None solves alpha* (the Chernoff point, to 1e-7, from kernels.first_guess:
  the quintic log Z through both ends' g and g', which the normaliser pass gives); a
  number in [0, 1] fixes it for this request (a sweep needs no restart).
- A tagged row SAMPLES ITS TOKEN HERE: from q*^(1/T) normalised (T = temperature, 0 =
  argmax), by inverse CDF with one uniform from (seed, number of tokens generated so far)
  (kernels.uniforms), so a request's tokens depend on its seed alone, not on batching,
  preemption or resume. The row's logits become 0 at that token and -inf elsewhere, so
  vLLM's own sampler picks it at any temperature, top-p or top-k. Its exact per-token
  diagnostics (token, alpha, logp_theta, logp_target, logp_q under the distribution
  sampled, KL(q*||theta), KL(q*||target), H(q*)) go to `state` under the tag.
- A row without the extra args (a stock /v1/completions request) gets log q* with alpha*
  as its logits: vLLM then samples q* with the request's own temperature, seed, min_p,
  top-k, top-p and penalties. What vLLM applies before this processor (logit_bias,
  allowed_token_ids, bad_words, min_tokens, structured outputs) would be overwritten, so
  stock.py refuses those requests with a 400 before they reach the engine.

One class for both of vLLM 0.32's model runners, so one `--logits-processors` name serves
whichever the engine picks (V2 on a GPU with Triton unless VLLM_USE_V2_MODEL_RUNNER=0; V1 on
CPU): it subclasses V1's `LogitsProcessor` (rows tracked by `update_state(BatchUpdate)`, the
position is the length of vLLM's live output-id list) and V2's (rows tracked by slot in
`add_request`, the position from `ctx.pos` and the slot's prompt length). Only the choice of
rows and positions differs; the math after it is shared.

Async scheduling (vLLM's default on GPU; the CPU platform turns it off) is handled, so
start_vllm.sh leaves it on (`--no-async-scheduling` turns it off):
- V1 appends a -1 placeholder to a request's output ids for the token still in flight and
  replaces it before `apply`; a placeholder counts as the position it holds either way, so
  the uniform of each position is the one synchronous scheduling uses.
- `apply` runs once more for a request that has just finished (EOS, a stop string, the
  length limit) before the scheduler removes it; that step's token is discarded. Its
  diagnostics land one position past the completion, and `state.pop` returns each
  record cut to the completion's length, so they never reach a reply. Stop strings, found in
  the API server after the fact, can cost a few such steps under either scheduling.
Speculative decoding is refused (V1 refuses custom processors with it; V2 here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2

from dual_sampling.maths import kernels
from dual_sampling.vllm_plugin.batch_rows import apply_moves
from dual_sampling.vllm_plugin.fused import state, stock
from dual_sampling.vllm_plugin.fused.setup import CONFIG_KEY
from dual_sampling.wire.fused_format import TokenArgs


STOCK = TokenArgs(tag=None, seed=0)  # a stock request's row: log q* at alpha*, vLLM samples

def _forget(row: "_Row") -> None:
    """A row that left the batch: its request's per-step records go (state.mark_removed)."""
    if row.tag is not None:
        state.mark_removed(row.tag)


@dataclass
class _Row:
    """One request in the persistent batch."""

    tag: Optional[str]
    seed: int
    alpha: Optional[float]
    temperature: float
    output_ids: list[int] = field(default_factory=list)  # V1's live list of generated ids
    alpha_method: str = "kl_symmetry"  # kernels.solve_rules
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    step: int = 0  # position in the completion of the token sampled this step

    @classmethod
    def of(cls, params: SamplingParams, output_ids: Optional[list[int]] = None) -> "_Row":
        args = TokenArgs.from_extra(params.extra_args) or STOCK  # validate_params checked
        row = cls(tag=args.tag, seed=args.seed, alpha=args.alpha,
                  temperature=float(args.temperature), alpha_method=args.alpha_method,
                  alpha_min=float(args.alpha_min), alpha_max=float(args.alpha_max),
                  output_ids=output_ids if output_ids is not None else [])
        if row.tag is not None:
            state.open_record(row.tag)
        return row


class FusedSampler(LogitsProcessor, LogitsProcessorV2):
    """See the module docstring. Inert on a server whose model is not the composite one."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        stock.check_extra_args(sampling_params)

    def __init__(self, vllm_config: Any, device_or_states: Any,
                 is_pin_memory: bool = False) -> None:
        """V1 passes (vllm_config, device, is_pin_memory), V2 (vllm_config, req_states)."""
        self.rows: dict[int, _Row] = {}  # V1: persistent-batch row -> request
        self.slots: dict[int, _Row] = {}  # V2: request slot -> request
        self.req_states = None if isinstance(device_or_states, torch.device) else device_or_states
        if self.req_states is not None and getattr(vllm_config, "speculative_config", None):
            raise ValueError("dual_sampling's FusedSampler samples one token per request and "
                             "step: serve the fused model without speculative decoding")
        spec = getattr(getattr(getattr(vllm_config, "model_config", None), "hf_config", None),
                       CONFIG_KEY, None)
        if isinstance(spec, dict):  # the composite model's server: compile the math now
            device = device_or_states if self.req_states is None \
                else vllm_config.device_config.device
            kernels.warm_up(int(spec["vocab_size"]), device)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, _, output_ids in batch_update.added:
            self._drop(index)
            self.rows[index] = _Row.of(params, output_ids)
        apply_moves(self.rows, batch_update.moved, _forget)

    def _drop(self, index: int, table: Optional[dict[int, _Row]] = None) -> None:
        row = (self.rows if table is None else table).pop(index, None)
        if row is not None:
            _forget(row)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """V2: a request takes slot `req_idx` (a slot's previous request has left)."""
        self._drop(req_idx, self.slots)
        self.slots[req_idx] = _Row.of(sampling_params)
        return True

    def _batch_rows(self, num_rows: int) -> dict[int, _Row]:
        """V1: logits row -> request, each with the position it samples (placeholders of
        tokens in flight under async scheduling count as the positions they hold)."""
        rows = {i: row for i, row in self.rows.items() if i < num_rows}
        for row in rows.values():
            row.step = len(row.output_ids)
        return rows

    def _context_rows(self, ctx: LogitsContext) -> dict[int, _Row]:
        """V2: logits row -> request (rows are reordered every step), each with its position:
        the row's input position + 1 minus the prompt's length. A row still short of the
        tokens fed at its latest (re)fill (a partial prefill, also of a request resumed after
        preemption) is left alone: its token is discarded, and its position is not one."""
        slots = ctx.expanded_idx_mapping.cpu().numpy()  # (R,) row -> slot
        seen = ctx.pos.cpu().numpy() + 1  # (R,) tokens up to the row's input, inclusive
        positions = seen - self.req_states.prompt_len.np[slots]  # (R,)
        filled = seen >= self.req_states.prefill_len.np[slots]  # (R,)
        rows = {}
        for i, (slot, step, ok) in enumerate(zip(slots.tolist(), positions.tolist(),
                                                 filled.tolist())):
            row = self.slots.get(slot)
            if row is not None and ok:
                row.step = int(step)
                rows[i] = row
        return rows

    def apply(self, logits: torch.Tensor, ctx: Optional[LogitsContext] = None) -> torch.Tensor:
        """V1 calls apply(logits), V2 apply(logits, ctx)."""
        stash = state.take_logits(logits.shape[0])
        if stash is None:
            return logits  # a dummy or warm-up run: no forward behind it
        by_row = self._batch_rows(logits.shape[0]) if ctx is None else self._context_rows(ctx)
        if not by_row:
            return logits  # no requests (a dummy run)
        t0 = time.perf_counter()
        index = sorted(by_row)
        states = [by_row[i] for i in index]
        device = logits.device
        idx = torch.tensor(index, device=device)
        if index == list(range(len(index))):  # the usual case: views, not copies of (R, V)
            rows = kernels.Rows.of(stash[0][:len(index)], stash[1][:len(index)])
        else:
            rows = kernels.Rows.of(stash[0][idx], stash[1][idx])
        solution = kernels.solve_per_row(rows, states)
        solve_s = time.perf_counter() - t0
        mix = solution.mixture()
        tagged = [r.tag is not None for r in states]
        if not all(tagged):  # stock requests: their logits become log q*, vLLM samples them
            plain = torch.tensor([not t for t in tagged], device=device)
            log_q = rows.take(plain).log_q(solution.alpha[plain], mix.log_z[plain])
            full = torch.full((log_q.shape[0], logits.shape[1]), -torch.inf,
                              dtype=logits.dtype, device=device)
            full[:, :log_q.shape[1]] = log_q
            logits[idx[plain]] = full
        if any(tagged):
            self._sample(logits, idx, states, torch.tensor(tagged, device=device), rows,
                         solution, mix)
        state.count(len(states), solve_s, time.perf_counter() - t0,
                    solution.evaluations)
        return logits

    def _sample(self, logits: torch.Tensor, idx: torch.Tensor, states: list[_Row],
                tagged: torch.Tensor, rows: kernels.Rows, solution: kernels.Solution,
                mix: kernels.Mixture) -> None:
        """Draw each tagged row's token, force it in `logits`, record its diagnostics."""
        picked = [row for row in states if row.tag is not None]
        seeds = np.array([r.seed for r in picked], dtype=np.uint64)
        steps = np.array([r.step for r in picked], dtype=np.uint64)
        temperature = np.array([r.temperature for r in picked], dtype=np.float64)
        if not bool(tagged.all()):
            rows, solution = rows.take(tagged), solution.take(tagged)
            mix = kernels.Mixture(*(x[tagged] for x in mix))
        columns = kernels.draw(rows, solution, mix, seeds, steps, temperature)
        target_rows = idx[tagged]
        logits.index_fill_(0, target_rows, -torch.inf)
        logits[target_rows, columns["token"]] = 0.0
        state.put([r.tag for r in picked], steps.tolist(),
                  {name: value.tolist() for name, value in columns.items()})
