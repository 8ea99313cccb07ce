"""Prompt logprobs as arrays, for this package's routes, without vLLM's per-position lists.

vLLM's API server turns each request's prompt-logprob tensors into Python lists, one
position at a time (`LogprobsProcessor._update_prompt_logprobs` in
vllm/v1/engine/logprobs.py), even with `flat_logprobs=True`; for `/v1/topk` that was half of
the API server's time (py-spy, 8 sequences of 128 tokens, k = 128), and the route then
turned the lists back into arrays. A request whose `SamplingParams.extra_args` holds
`RAW_KEY: True` gets a `RawPromptLogprobs` container instead: the engine's
`(token_ids, logprobs)` arrays per prefill chunk, `(n, k + 1)` each, the actual next token in
column 0. Every other request goes through vLLM's code unchanged.

Installed once per API server process by `install()`; when this vLLM version lacks the two
methods it wraps, it logs why and does nothing, and the routes read the flat lists instead.
"""
from __future__ import annotations

import logging

import numpy as np

from dual_sampling.vllm_plugin import compat, patches

RAW_KEY = "dual_sampling_raw_prompt_logprobs"

log = logging.getLogger(__name__)


class RawPromptLogprobs(list):
    """`[(token_ids (n, w) int64, logprobs (n, w) float32), ...]`, one pair per prefill chunk."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All chunks stacked: `token_ids (L-1, w)`, `logprobs (L-1, w)`."""
        return (np.concatenate([ids for ids, _ in self]),
                np.concatenate([logp for _, logp in self]))


def _array(values) -> np.ndarray:
    return values.numpy() if hasattr(values, "numpy") else np.asarray(values)


def install() -> bool:
    if not compat.usable("raw_prompt_logprobs"):
        return False  # the routes read the flat lists
    from vllm.v1.engine.logprobs import LogprobsProcessor

    def make_from_new_request(make):
        def from_new_request(cls, tokenizer, request):
            processor = make(cls, tokenizer, request)
            extra = getattr(request.sampling_params, "extra_args", None) or {}
            if extra.get(RAW_KEY) and processor.prompt_logprobs is not None:
                processor.prompt_logprobs = RawPromptLogprobs()
            return processor
        return from_new_request

    def make_update(update):
        def _update_prompt_logprobs(self, prompt_logprobs_tensors) -> None:
            if not isinstance(self.prompt_logprobs, RawPromptLogprobs):
                return update(self, prompt_logprobs_tensors)
            token_ids, logprobs, *_ = prompt_logprobs_tensors
            self.prompt_logprobs.append((np.array(_array(token_ids), dtype=np.int64),
                                         np.array(_array(logprobs), dtype=np.float32)))
        return _update_prompt_logprobs

    patches.replace(LogprobsProcessor, "from_new_request", make_from_new_request,
                    feature="raw_prompt_logprobs")
    patches.replace(LogprobsProcessor, "_update_prompt_logprobs", make_update,
                    feature="raw_prompt_logprobs")
    return True
