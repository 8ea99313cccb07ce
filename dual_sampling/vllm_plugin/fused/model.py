"""`DualSamplingMixtureForCausalLM`: pi_theta and pi_t as two submodules of one vLLM model.

The server is started on the theta checkpoint with hf-overrides (fused/setup.py writes
them) that name this architecture and add `dual_sampling_fused`: the target checkpoint's
path, both original architectures and the real vocabulary size. Each model is built by
vLLM's own model class (`init_vllm_registered_model`), so tensor parallelism, prefix
caching, continuous batching and CUDA graphs stay vLLM's; both stacks' attention layers get
KV cache (same token stream, same positions, same block size) in one KV-cache group, each
layer with its own head size and KV heads (fused/setup.py checks that vLLM can group them).

Weights load from where the checkpoints lie: theta's are the served model's own (vLLM's
default loader reads them, sharded safetensors included), the target's come through the
loader's `secondary_weights` with the prefix `target.`; nothing is copied or merged.

`forward` returns both stacks' last hidden states side by side; `compute_logits` splits
them, runs each model's own `compute_logits`, puts both models' logits over the tokenizer's
ids (B, V) in the worker stash as views, without a copy or a log-softmax (fused/state.py;
ids past the tokenizer's vocabulary, a checkpoint's padded output rows, are left out, so
they are never sampled) and returns theta's logits: normalising, the mixing, alpha* and
the token are the logits processor's (fused/sampler.py, fused kernels in maths/kernels.py),
which this model requires and checks for at start-up. Under speculative decoding
(`start_vllm.sh --fused --speculate K`) theta is also vLLM's draft model and speculate.py
does that work for the K + 1 verified positions of each request instead.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.transformers_utils.config import get_config

from dual_sampling.vllm_plugin.fused import state
from dual_sampling.vllm_plugin.fused.setup import ARCHITECTURE, CONFIG_KEY, SAMPLER

TARGET_PREFIX = "target."


class FusedModelError(RuntimeError):
    """The fused server was started without what the composite model needs."""


class DualSamplingMixtureForCausalLM(nn.Module):
    """theta and target in one engine; see the module docstring."""

    dual_sampling_composite = True  # what speculate.py asks of a runner's model

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        spec = getattr(hf_config, CONFIG_KEY, None)
        if not isinstance(spec, dict):
            raise FusedModelError(
                f"{ARCHITECTURE} needs `{CONFIG_KEY}` in the model config: start the server "
                f"with `./start_vllm.sh --fused --theta A --target B`.")
        processors = [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}"
                      for p in (vllm_config.model_config.logits_processors or [])]
        if vllm_config.speculative_config is not None:
            # speculative mode: vLLM refuses logits processors; speculate.py samples instead
            from dual_sampling.vllm_plugin.fused import speculate
            speculate.check_config(vllm_config.speculative_config, vllm_config.model_config)
            speculate.install()
        elif SAMPLER not in processors:
            raise FusedModelError(
                f"{ARCHITECTURE} samples through its logits processor, which this server "
                f"lacks: add `--logits-processors {SAMPLER}` (start_vllm.sh --fused does).")
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise FusedModelError(
                f"{ARCHITECTURE} runs with --pipeline-parallel-size 1 only (got "
                f"{vllm_config.parallel_config.pipeline_parallel_size}); use --tp instead.")
        # theta's own config, not the served one: that one carries the larger model's head
        # size and KV heads for vLLM's buffers (setup.hf_overrides)
        trust = vllm_config.model_config.trust_remote_code
        theta_config = get_config(vllm_config.model_config.model, trust_remote_code=trust)
        target_config = get_config(spec["target"], trust_remote_code=trust)
        self.vocab_size = int(spec["vocab_size"])  # the tokenizer's ids; the rest is padding
        self.hidden_theta = theta_config.get_text_config().hidden_size
        self.theta = init_vllm_registered_model(
            vllm_config, prefix=maybe_prefix(prefix, "theta"), hf_config=theta_config,
            architectures=theta_config.architectures)
        self.target = init_vllm_registered_model(
            vllm_config, prefix=maybe_prefix(prefix, "target"), hf_config=target_config,
            architectures=list(spec["target_architectures"]))
        self.secondary_weights = [DefaultModelLoader.Source(
            spec["target"], revision=None, prefix=TARGET_PREFIX)]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.theta.embed_input_ids(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        hidden_theta = self.theta(input_ids, positions, intermediate_tensors, inputs_embeds)
        hidden_target = self.target(input_ids, positions, intermediate_tensors, None)
        return torch.cat([hidden_theta, hidden_target], dim=-1)  # (N, H_theta + H_target)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        hidden_theta, hidden_target = hidden_states.split(
            [self.hidden_theta, hidden_states.shape[-1] - self.hidden_theta], dim=-1)
        logits_theta = self.theta.compute_logits(hidden_theta)  # (B, V_theta)
        logits_target = self.target.compute_logits(hidden_target)  # (B, V_target)
        if logits_theta is None or logits_target is None:
            return logits_theta
        state.put_logits(logits_theta[:, :self.vocab_size],
                         logits_target[:, :self.vocab_size])
        return logits_theta

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Theta's weights come first (unprefixed), then the target's (`target.`-prefixed)."""
        stream = iter(weights)
        first_target: list[tuple[str, torch.Tensor]] = []

        def theta_part() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in stream:
                if name.startswith(TARGET_PREFIX):
                    first_target.append((name, tensor))
                    return
                yield name, tensor

        def target_part() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in itertools.chain(first_target, stream):
                yield name[len(TARGET_PREFIX):], tensor

        loaded = {f"theta.{name}" for name in self.theta.load_weights(theta_part())}
        return loaded | {f"target.{name}" for name in self.target.load_weights(target_part())}
