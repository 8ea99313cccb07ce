"""What a fused server does with a stock OpenAI request, decided before the engine sees it.

A stock `/v1/completions` or `/v1/chat/completions` request to a fused server samples q*
(alpha*, or `extra_args.dual_sampling_fused.alpha`) at the request's temperature and seed. The
non-speculative engine hands vLLM's sampler log q* as the logits (fused/sampler.py), so what
vLLM applies AFTER the custom logits processors applies to q* as it would to any model:
min_p, top_k, top_p, the penalties, logprobs (pi_theta's, vLLM's raw_logprobs). The
speculative engine (fused/speculate.py) applies top_k and top_p to q* itself, exactly
(speculative sampling is exact for any target distribution, the truncated one included),
and returns logprobs in vLLM's layout; vLLM refuses min_p there.

What neither applies is refused here with a 400 naming the parameter, never dropped
silently:
- everywhere fused: logit_bias, allowed_token_ids, bad_words, min_tokens,
  thinking_token_budget (vLLM applies them before the custom processor, which replaces the
  logits by log q*), structured outputs (a grammar mask on theta's logits is not a mask on
  q*), trace_decode_token_ids;
- speculative only: presence/frequency/repetition penalties (they depend on the drafted
  tokens inside a verify step) and logprob_token_ids.

`install()` wraps `SamplingParams.verify`, which vLLM's input processor calls in the API
server for every request (the speculative engine has no logits processor whose
`validate_params` could do it); it acts only on a server of the composite model.
"""
from __future__ import annotations

from typing import Any, Optional

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from dual_sampling.vllm_plugin import patches
from dual_sampling.vllm_plugin.fused.setup import ARCHITECTURE
from dual_sampling.wire.fused_format import TokenArgs, TokenArgsError


def _refused(parameter: str, value: Any, why: str) -> VLLMValidationError:
    return VLLMValidationError(
        f"{parameter} = {value!r}: this fused server (theta and target in one engine, "
        f"sampling q*) {why}; leave {parameter} unset here, or send the request to a "
        f"theta or target server", parameter=parameter, value=value)


def check_extra_args(params: SamplingParams) -> Optional[TokenArgs]:
    """The request's fused arguments (`extra_args.dual_sampling_fused`, the fused route's or
    a stock request's; None without them); VLLMValidationError (a 400 naming the argument)
    where fused_format.TokenArgs refuses them."""
    try:
        return TokenArgs.from_extra(params.extra_args)
    except TokenArgsError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.parameter, value=exc.value) from None


def check(params: SamplingParams, speculative: bool) -> None:
    """VLLMValidationError (a 400) naming the first parameter a fused server would not apply
    to q*; see the module docstring."""
    check_extra_args(params)
    lost = {"logit_bias": params.logit_bias, "allowed_token_ids": params.allowed_token_ids,
            "bad_words": params.bad_words, "min_tokens": params.min_tokens,
            "thinking_token_budget": params.thinking_token_budget,
            "trace_decode_token_ids": params.trace_decode_token_ids}
    for name, value in lost.items():
        if value:
            raise _refused(name, value, "does not apply it to q* (its sampler replaces the "
                                        "logits by log q* after vLLM applied it)")
    if params.structured_outputs is not None:
        raise _refused("structured_outputs", "set", "cannot constrain q* to a grammar "
                                                    "(response_format, guided decoding)")
    if not speculative:
        return
    penalties = {"presence_penalty": (params.presence_penalty, 0.0),
                 "frequency_penalty": (params.frequency_penalty, 0.0),
                 "repetition_penalty": (params.repetition_penalty, 1.0)}
    for name, (value, neutral) in penalties.items():
        if value != neutral:
            raise _refused(name, value, "drafts tokens speculatively (--speculate) and does "
                                        "not apply penalties there; the non-speculative "
                                        "fused server applies them to q*")
    if params.logprob_token_ids is not None:
        raise _refused("logprob_token_ids", params.logprob_token_ids,
                       "drafts tokens speculatively (--speculate) and returns top-k "
                       "logprobs only")


def install() -> None:
    """Wrap `SamplingParams.verify` (once a process) so that a composite-model server runs
    `check` on every request; any other server is untouched."""
    def make(original):
        def verify(self: SamplingParams, model_config: Any, speculative_config: Optional[Any],
                   *args: Any, **kwargs: Any) -> None:
            original(self, model_config, speculative_config, *args, **kwargs)
            if ARCHITECTURE in (getattr(model_config, "architectures", None) or []):
                check(self, speculative=speculative_config is not None)
        return verify

    patches.replace(SamplingParams, "verify", make, feature="fused")
