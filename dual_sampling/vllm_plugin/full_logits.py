"""A session's whole next-token distribution, from the engine's worker to the session route.

The exact two-engine transport (dual_sampling/core/transports/session.py with `top_k` unset) needs
each model's logits over the whole vocabulary after every session step. vLLM's logprobs path
can only give a sorted top-k (k = V means a full sort and the ids beside it), turned into
Python lists in the API server; so the logits take their own path:

- `FullLogits` is a logits processor (start_vllm.sh passes `--logits-processors` to theta,
  target and model servers). It is inert for every request but those whose
  `SamplingParams.extra_args[FULL_KEY]` names a tag: for those it keeps the row's logits,
  cut to the tokenizer's ids and in the dtype the model computed them (the sampler has cast
  them to float32; a bfloat16 model's values are cast back, which loses nothing), keyed by
  (tag, position), position = the tokens the row has seen (prompt and output). It never
  changes the logits.
- The session route, once a step's outputs are in, takes them with one
  `collective_rpc("dual_sampling_pop_full", args=({tag: position},))`
  (`FullLogitsWorker`, mixed into the worker class by `--worker-extension-cls`).

Why (tag, position): under async scheduling vLLM runs a request one step past its last token
before it leaves the batch (fused/sampler.py says more); that step's row is at position + 1
and is never taken. Rows not taken within `ABANDONED_AFTER_S` are dropped.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2

from dual_sampling.vllm_plugin.batch_rows import apply_moves

FULL_KEY = "dual_sampling_full"
ABANDONED_AFTER_S = 120.0

_rows: dict[tuple[str, int], tuple[float, torch.Tensor]] = {}
_lock = threading.Lock()
_width: list[Optional[int]] = [None]  # the tokenizer's ids (set by the processor)


def _put(tag: str, position: int, row: torch.Tensor) -> None:
    now = time.monotonic()
    with _lock:
        _rows[(tag, position)] = (now, row)
        if len(_rows) > 64:
            for key in [k for k, (at, _) in _rows.items() if now - at > ABANDONED_AFTER_S]:
                del _rows[key]


def pop(wanted: dict[str, int]) -> dict[str, Any]:
    """`{"rows": the bytes of the (n, V) rows in the model's dtype, "n", "width", "dtype": name,
    "missing": [tags without a row]}` for `wanted = {tag: position}`, in its order (bytes:
    vLLM's RPC results carry no array type)."""
    with _lock:
        found = [_rows.pop((tag, position), (0.0, None))[1] for tag, position in wanted.items()]
    missing = [tag for tag, row in zip(wanted, found) if row is None]
    rows = [row for row in found if row is not None]
    if missing or not rows:
        return {"rows": b"", "n": 0, "width": 0, "dtype": "float32", "missing": missing}
    stacked = torch.stack(rows).cpu()
    dtype = str(stacked.dtype).removeprefix("torch.")
    if stacked.dtype != torch.float32:  # 16-bit values travel as their bits
        stacked = stacked.view(torch.int16)
    return {"rows": stacked.numpy().tobytes(), "n": stacked.shape[0],
            "width": stacked.shape[1], "dtype": dtype, "missing": missing}


class FullLogitsWorker:
    """Worker methods (`--worker-extension-cls`) the session route calls by name."""

    def dual_sampling_pop_full(self, wanted: dict[str, int]) -> dict[str, Any]:
        return pop(wanted)


class _Row:
    def __init__(self, tag: str, prompt_ids: list[int], output_ids: list[int]) -> None:
        self.tag, self.prompt_ids, self.output_ids = tag, prompt_ids, output_ids


class FullLogits(LogitsProcessor, LogitsProcessorV2):
    """See the module docstring. One class for both of vLLM 0.32's model runners (as
    fused/sampler.py): V1 (CPU; rows tracked by `update_state`, the position is the length
    of the live prompt and output id lists) and V2 (GPU; rows by slot in `add_request`, the
    position is `ctx.pos + 1`, the tokens up to the row's input). Not run on a GPU yet."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        tag = (sampling_params.extra_args or {}).get(FULL_KEY)
        if tag is not None and not isinstance(tag, str):
            raise ValueError(f"extra_args[{FULL_KEY!r}] must be a string tag")

    def __init__(self, vllm_config: Any, device_or_states: Any,
                 is_pin_memory: bool = False) -> None:
        """V1 passes (vllm_config, device, is_pin_memory), V2 (vllm_config, req_states)."""
        self.slots: dict[int, str] = {}  # V2: request slot -> tag
        model_config = vllm_config.model_config
        self.dtype = model_config.dtype
        self.width = model_config.get_vocab_size()
        try:
            from vllm.tokenizers import cached_tokenizer_from_config
            self.width = min(self.width, len(cached_tokenizer_from_config(model_config)))
        except Exception:  # noqa: BLE001 - no tokenizer (skip_tokenizer_init): every row
            pass
        _width[0] = self.width
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # so vLLM calls it for greedy requests too (it changes nothing)

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            tag = (params.extra_args or {}).get(FULL_KEY) if params is not None else None
            if tag is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(tag, prompt_ids, output_ids)
        apply_moves(self.rows, batch_update.moved)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """V2: a request takes slot `req_idx`."""
        tag = (sampling_params.extra_args or {}).get(FULL_KEY)
        if tag is None:
            self.slots.pop(req_idx, None)
        else:
            self.slots[req_idx] = tag
        return True

    def apply(self, logits: torch.Tensor, ctx: Optional[LogitsContext] = None) -> torch.Tensor:
        """V1 calls apply(logits), V2 apply(logits, ctx)."""
        if ctx is not None:
            if self.slots:
                slots = ctx.expanded_idx_mapping.cpu().tolist()
                seen = (ctx.pos + 1).cpu().tolist()
                for i, (slot, position) in enumerate(zip(slots, seen)):
                    tag = self.slots.get(slot)
                    if tag is not None:
                        _put(tag, position, logits[i, :self.width].to(self.dtype, copy=True))
            return logits
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                position = len(row.prompt_ids) + len(row.output_ids)
                _put(row.tag, position, logits[index, :self.width].to(self.dtype, copy=True))
        return logits


def keeps_full_logits(model_config: Any) -> bool:
    """Whether the engine runs FullLogits (start_vllm.sh's --logits-processors)."""
    for processor in getattr(model_config, "logits_processors", None) or ():
        name = processor if isinstance(processor, str) else \
            f"{processor.__module__}:{processor.__qualname__}"
        if name.replace(".FullLogits", ":FullLogits") == f"{__name__}:FullLogits":
            return True
    return False
