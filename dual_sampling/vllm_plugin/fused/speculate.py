"""Speculative sampling of q* with theta as the draft (`start_vllm.sh --fused --speculate K`).

The composite model (model.py) is vLLM's main model and theta, loaded a second time by
vLLM's own draft-model proposer (`--speculative-config {"method": "draft_model", ...}`), its
draft. Each engine step the draft proposes K tokens per request, one theta decode step each;
the composite verifies them in ONE pass over K + 1 positions of both models, and this module
replaces vLLM's rejection sampler for that step (vLLM refuses custom logits processors under
speculative decoding, so the per-step work of sampler.py moves here):

- q* at every verified position: alpha by the request's rule (alpha*, ess_balance,
  entropy or its fixed alpha, clamped to its [alpha_min, alpha_max]) from both models'
  logits, the same solve as the non-speculative engine (kernels.solve_rules);
- draft token x at a position is accepted with probability min(1, q(x) / p(x)), where
  q = q*^(1/T) normalised and p = theta^(1/T) normalised, the draft's own distribution (the
  ratio q*/pi_theta is the token's importance weight); the first rejection draws its token
  from norm(max(0, q - p)) and ends the request's step; when all K are accepted, the
  position after them draws from q (the bonus token). The emitted tokens are distributed
  exactly as q (Leviathan et al. 2023, Chen et al. 2023), whatever the draft; acceptance
  is 1 - TV(p, q) per position. T = 0: a draft is accepted iff it is the argmax of q*, and
  the step's last token is that argmax, so greedy output equals the non-speculative one.
- Every draw is by inverse CDF with a uniform from (seed, position in the completion,
  stream) alone (kernels.uniforms): the draft's (drawn in theta's proposer, patched here),
  the acceptance test's and the residual's or bonus's. A request's tokens therefore depend
  on its seed and K, not on batching. The bonus and residual use stream 0, the uniform the
  non-speculative engine uses at the same position, so K = 0 would give its tokens.
- Per emitted token the record has the non-speculative engine's fields (state.FIELDS):
  alpha, logp_theta, logp_target, logp_q (under q*^(1/T) normalised; 0 at T = 0), both KLs
  and H(q*) of the position it was emitted at.

Untagged rows (a stock /v1/completions request) go through the same steps at the
request's temperature and seed (random without one), with q restricted by the request's
top_k and top_p as vLLM's sampler restricts a distribution (`truncate`): the steps above
are exact for any q, so the tokens follow the truncated q* exactly (vLLM itself refuses
min_p and logit_bias under speculative decoding). Logprobs come back in vLLM's layout
(`emitted_logprobs`): pi_theta's at each emitted token, as the non-speculative engine's
(vLLM's raw_logprobs). Penalties and the rest that this engine does not apply are refused
with a 400 before a request reaches it (stock.py).

`install()` patches two vLLM methods (named in compat.py), inert unless the runner serves
the composite model with a speculative config: `GPUModelRunner._sample` (the V1 runner; the
CPU runner subclasses it) and `SpecDecodeBaseProposer._sample_from_logits` (the draft's
probabilistic draw). start_vllm.sh turns async scheduling off in this mode (the positions
are read from the input batch as synchronous scheduling leaves it).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from dual_sampling.maths import kernels
from dual_sampling.vllm_plugin import patches
from dual_sampling.vllm_plugin.fused import state
from dual_sampling.vllm_plugin.fused.verify import (STREAM_DRAFT, Request, Step, stream_uniforms,
                                                    verify)
from dual_sampling.vllm_plugin.handoff import HandOff
from dual_sampling.wire.fused_format import TokenArgs

log = logging.getLogger(__name__)

PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID: no token in this column


@dataclass
class DraftContext:
    """What the draft's draws of the next proposal need, set by the step before it."""

    seeds: np.ndarray  # (n,) uint64, one per batch row
    temperature: torch.Tensor  # (n,) float32; 0 = argmax
    position: np.ndarray  # (n,) position of the first draft token
    vocab: int  # the tokenizer's ids: the draft never draws past them
    calls: int = 0  # draft steps drawn so far in this proposal


DRAFT: HandOff[DraftContext] = HandOff("the verify step's seeds for the draft's draws")
_unseeded: dict[str, int] = {}  # request id -> the seed drawn for a request without one


def _seed_of(req_id: str, params: Any) -> int:
    if params.seed is not None:
        return int(params.seed)
    if len(_unseeded) > 100_000:
        _unseeded.clear()
    return _unseeded.setdefault(req_id, random.getrandbits(63))


def batch_requests(runner: Any, drafts: list[int]) -> list[Request]:
    """The runner's batch rows as Requests (drafts: each row's draft tokens this step)."""
    batch, out = runner.input_batch, []
    for i, req_id in enumerate(batch.req_ids):
        params = runner.requests[req_id].sampling_params
        args = TokenArgs.from_extra(params.extra_args)  # checked in the API server (stock.py)
        position = int(batch.num_tokens_no_spec[i]) - int(batch.num_prompt_tokens[i])
        limits = {"top_k": int(params.top_k), "top_p": float(params.top_p)}
        if args is None:
            out.append(Request(None, _seed_of(req_id, params), None,
                               float(params.temperature), max(position, 0), drafts[i],
                               **limits))
        else:
            out.append(Request(args.tag, args.seed, args.alpha, float(args.temperature),
                               max(position, 0), drafts[i], **limits,
                               alpha_method=args.alpha_method,
                               alpha_min=float(args.alpha_min),
                               alpha_max=float(args.alpha_max)))
    return out


class SpeculativeSetupError(RuntimeError):
    """The fused server's speculative config is not the one this module is exact for."""


def check_config(speculative: Any, model_config: Any) -> None:
    """SpeculativeSetupError unless the draft is theta itself, drawn probabilistically, with
    the standard rejection step (start_vllm.sh --fused --speculate K writes this config)."""
    from pathlib import Path
    problems = []
    if speculative.method != "draft_model":
        problems.append(f"method is {speculative.method!r}, not 'draft_model'")
    if getattr(speculative, "draft_sample_method", None) != "probabilistic":
        problems.append("draft_sample_method must be 'probabilistic' (a greedy draft gives no "
                        "draft distribution to correct for)")
    if getattr(speculative, "rejection_sample_method", "standard") != "standard":
        problems.append("rejection_sample_method must be 'standard'")
    draft = getattr(speculative, "model", None)
    if draft is None or Path(str(draft)).resolve() != Path(str(model_config.model)).resolve():
        problems.append(f"the draft model ({draft}) must be theta ({model_config.model})")
    if problems:
        raise SpeculativeSetupError(
            "the fused model's speculative mode samples q* exactly only with theta as a "
            "probabilistic draft: " + "; ".join(problems)
            + ". Start it with `start_vllm.sh --fused --theta A --target B --speculate K`.")


def serves_speculative_composite(runner: Any) -> bool:
    """Whether this runner serves the composite model with a speculative config (cached)."""
    known = getattr(runner, "_dual_sampling_speculative", None)
    if known is None:
        model = runner.get_model() if hasattr(runner, "get_model") else None
        known = bool(getattr(runner, "speculative_config", None)) and bool(
            getattr(model, "dual_sampling_composite", False))
        runner._dual_sampling_speculative = known
    return known


_in_batch: set[str] = set()  # tags of the requests in the previous step's batch


def emitted_logprobs(sampler: Any, logits: torch.Tensor, step: Step, out: torch.Tensor,
                     num_logprobs: int) -> Any:
    """vLLM's LogprobsTensors for one step's output `out` (n, width) of ids: a row per cell,
    row-major, as the runner reads them (cells without a token hold id 0; the runner drops
    them). Each row: the emitted token's logprob, then the top `num_logprobs` (-1: all),
    under what the non-speculative engine returns: theta's logits at the token's row (vLLM's
    default raw_logprobs, or raw_logits), or the q the token was drawn from
    (processed_logprobs / processed_logits)."""
    n, width = out.shape
    index = torch.tensor([step.rows[i][j] if j < len(step.rows[i]) else 0
                          for i in range(n) for j in range(width)], device=logits.device)
    tokens = out.flatten().to(device=logits.device, dtype=torch.int64).clamp(min=0)  # (n*w,)
    mode = getattr(sampler, "logprobs_mode", "raw_logprobs")
    if mode.startswith("processed"):
        values = torch.full((len(index), logits.shape[1]), -torch.inf, dtype=torch.float32,
                            device=logits.device)
        dense = step.dense_log_q(index)
        values[:, :dense.shape[1]] = dense.float()
    else:
        values = logits[index].float()  # theta's, as the composite returns them
        if mode == "raw_logprobs":
            values = torch.log_softmax(values, dim=-1)
    k = values.shape[1] if num_logprobs == -1 else num_logprobs
    return sampler.gather_logprobs(values, k, tokens)


def track_records(tags: set[str]) -> None:
    """Open the record of each tagged request new to the batch, and mark those that left
    (finished, aborted, preempted) as the non-speculative processor does on its batch
    updates, so records of requests nobody pops are dropped in time."""
    for tag in tags - _in_batch:
        state.open_record(tag)
    for tag in _in_batch - tags:
        state.mark_removed(tag)
    _in_batch.clear()
    _in_batch.update(tags)


def sample_step(runner: Any, logits: torch.Tensor, metadata: Any) -> Any:
    """The runner's `_sample` on a speculative composite server (see the module docstring)."""
    from vllm.v1.outputs import SamplerOutput
    stash = state.take_logits(logits.shape[0])
    if stash is None:
        return None  # a dummy run: vLLM's own sampler
    t0 = time.perf_counter()
    n = len(runner.input_batch.req_ids)
    drafts = list(metadata.num_draft_tokens) if metadata is not None else [0] * n
    requests = batch_requests(runner, drafts)
    if sum(r.drafts + 1 for r in requests) != logits.shape[0]:
        return None
    track_records({r.tag for r in requests if r.tag is not None})
    if metadata is not None and sum(drafts):
        draft_ids = metadata.draft_token_ids
        draft_probs = runner._get_spec_decode_draft_probs(metadata)
    else:
        draft_ids, draft_probs = torch.zeros(0, dtype=torch.int64), None
    step, columns = verify(stash[0], stash[1], requests, draft_ids, draft_probs)
    width = max(drafts) + 1 if drafts else 1
    out = torch.full((n, width), PLACEHOLDER, dtype=torch.int32)
    for i, ids in enumerate(step.tokens):
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    tags, positions, picked = [], [], []
    k = 0
    for r, ids in zip(requests, step.tokens):
        for j in range(len(ids)):
            if r.tag is not None:
                tags.append(r.tag)
                positions.append(r.position + j)
                picked.append(k)
            k += 1
    if tags:
        state.put(tags, positions, {name: [values[i] for i in picked]
                                    for name, values in columns.items()})
    DRAFT.put(DraftContext(
        seeds=np.array([r.seed for r in requests], dtype=np.uint64),
        temperature=torch.tensor([r.temperature for r in requests], dtype=torch.float32,
                                 device=logits.device),
        position=np.array([r.position + len(ids) for r, ids in zip(requests, step.tokens)]),
        vocab=int(stash[0].shape[1])), rows=len(requests))
    num_logprobs = runner.input_batch.sampling_metadata.max_num_logprobs
    logprobs = None if num_logprobs is None else emitted_logprobs(
        runner.sampler, logits, step, out, num_logprobs)
    elapsed = time.perf_counter() - t0
    state.count(len(requests), step.seconds["solve"], elapsed, step.solver_evaluations)
    state.count_speculation(step.proposed, step.accepted, sum(map(len, step.tokens)),
                            step.seconds)
    return SamplerOutput(sampled_token_ids=out.to(logits.device), logprobs_tensors=logprobs)


def draft_draw(logits: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The draft's draw at one proposal step, seeded like the rest (None: no speculative
    composite step before it, vLLM's own draw). logits (n, V_theta); ids past the
    tokenizer's vocabulary are never drawn, so the draft distribution p is theta's over the
    ids q* lives on."""
    ctx = DRAFT.peek(logits.shape[0])  # read at each of the proposal's K draws
    if ctx is None:
        return None
    logits = logits.float()
    if logits.shape[1] > ctx.vocab:
        logits[:, ctx.vocab:] = -torch.inf
    temperature = ctx.temperature.to(logits.device)
    greedy = temperature <= 0
    scale = torch.where(greedy, 1.0, temperature)
    probs = torch.softmax(logits / scale[:, None], dim=-1)
    u = torch.from_numpy(stream_uniforms(ctx.seeds, ctx.position + ctx.calls, STREAM_DRAFT))
    token = kernels.inverse_cdf(probs, u.to(logits.device))
    token = torch.where(greedy, probs.argmax(dim=-1), token)
    ctx.calls += 1
    return token, probs


def install() -> None:
    """Patch the two vLLM methods (once a process); inert on any other server."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer as proposer_cls
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as runner_cls
    def make_sample(original_sample):
        def _sample(self, logits, spec_decode_metadata):
            if logits is not None and serves_speculative_composite(self):
                out = sample_step(self, logits, spec_decode_metadata)
                if out is not None:
                    return out
            return original_sample(self, logits, spec_decode_metadata)
        return _sample

    def make_draw(original_draw):
        def _sample_from_logits(self, logits, sampling_metadata):
            drawn = draft_draw(logits)  # None unless a speculative composite step set it up
            return drawn if drawn is not None else original_draw(self, logits,
                                                                 sampling_metadata)
        return _sample_from_logits

    patches.replace(runner_cls, "_sample", make_sample, feature="speculative")
    patches.replace(proposer_cls, "_sample_from_logits", make_draw, feature="speculative")
