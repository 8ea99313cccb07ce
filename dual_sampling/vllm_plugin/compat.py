"""Every private vLLM name this plugin wraps, checked before it is touched.

The plugin patches vLLM internals that carry no stability promise (tuning.py, session.py's
send gate, raw_logprobs.py, fused/stock.py, fused/speculate.py), each replaced method through
patches.replace, which records it under its feature here (tests/test_patches.py checks that
every one is listed). Each feature lists the names it needs in `PRIVATE`, with the
leading parameters a callable must take. `usable(feature)` checks them and, when one is
missing or changed, logs one warning naming it and returns False, so the caller leaves vLLM
stock (the feature is a speed-up; stock behaviour gives the same outputs).

`fused` is different: the fused engine (fused/*.py) is built on these names and has no stock
fallback, so a fused server of another vLLM fails at start-up where one is gone; listing them
here makes an upgrade fail one clear test instead. They include the behaviour its processor
relies on under async scheduling (V1 fills the -1 placeholders of tokens in flight before
the logits processors run) and the KV-cache grouping that lets one engine hold two KV layouts.
tests/test_compat.py checks every entry against the installed vLLM, so an upgrade fails one
clear test. `warn_if_unpinned()` logs once per process when the running vLLM is not
`PINNED_VLLM`, the version pyproject.toml pins and the tests pass on.

To try another vLLM: install it, run `python -m dual_sampling.vllm_plugin.compat` (lists
what is missing), then the test suite.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Optional

PINNED_VLLM = "0.32.0"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Private:
    """One private vLLM name: `module`, a dotted `name` in it, the parameters it must take."""

    module: str
    name: str
    params: tuple[str, ...] = ()
    """Leading parameter names, in order (empty: only that the name exists)."""

    def problem(self) -> Optional[str]:
        """None when the name resolves with those parameters; else what is wrong."""
        where = f"{self.module}.{self.name}"
        try:
            obj = importlib.import_module(self.module)
            for part in self.name.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            return f"{where} is missing ({exc})"
        if self.params:
            func = getattr(obj, "_dual_sampling_original", obj)  # already wrapped (patches.py)
            if func is not obj and inspect.ismethod(obj):  # a classmethod: bind it the same
                func = func.__get__(obj.__self__)
            try:
                names = tuple(inspect.signature(func).parameters)
            except (TypeError, ValueError):
                return f"{where} has no readable signature"
            if names[:len(self.params)] != self.params:
                return f"{where} takes {names}, expected {self.params} first"
        return None


SHM = "vllm.distributed.device_communicators.shm_broadcast"
V1_PROCS = "vllm.v1.sample.logits_processor"
V2_PROCS = "vllm.v1.worker.gpu.sample.logits_processor"
PRIVATE: dict[str, tuple[Private, ...]] = {
    "shm_spin_cap": (  # tuning.cap_spin
        Private(SHM, "SpinCondition.__init__", ("self", "is_reader", "context", "notify_address",
                                                "busy_loop_s")),
        Private(SHM, "SpinCondition.wait", ("self", "timeout_ms")),
        Private(SHM, "SpinCondition.record_read", ("self",)),
    ),
    "input_gap": (  # tuning.gather_input
        Private("vllm.v1.engine.core", "EngineCoreProc._process_input_queue", ("self",)),
        Private("vllm.v1.engine.core", "EngineCoreProc._handle_client_request",
                ("self", "request_type", "request")),
        Private("vllm.v1.engine.core", "EngineCoreProc.has_work", ("self",)),
    ),
    "session_gate": (  # session._SendGate
        Private("vllm.v1.engine.core_client", "AsyncMPClient.add_request_async",
                ("self", "request")),
        Private("vllm.v1.engine", "EngineCoreRequest.external_req_id"),
    ),
    "raw_prompt_logprobs": (  # raw_logprobs.install
        Private("vllm.v1.engine.logprobs", "LogprobsProcessor.from_new_request",
                ("tokenizer", "request")),
        Private("vllm.v1.engine.logprobs", "LogprobsProcessor._update_prompt_logprobs",
                ("self", "prompt_logprobs_tensors")),
    ),
    "sessions": (  # session.py: streaming-input requests
        Private("vllm.engine.protocol", "StreamingInput"),
        Private("vllm.inputs.engine", "tokens_input"),
    ),
    "fused": (  # fused/model.py, fused/sampler.py, fused/state.py: no stock fallback
        Private("vllm.model_executor.models.utils", "init_vllm_registered_model",
                ("vllm_config", "prefix", "hf_config", "architectures")),
        Private("vllm.model_executor.model_loader.default_loader", "DefaultModelLoader.Source",
                ("model_or_path", "revision", "subfolder", "prefix")),
        Private("vllm.transformers_utils.config", "get_config",
                ("model", "trust_remote_code")),
        Private(V1_PROCS, "LogitsProcessor.update_state", ("self", "batch_update")),
        Private(V1_PROCS, "BatchUpdate", ("batch_size", "removed", "added", "moved")),
        Private(V1_PROCS, "MoveDirectionality.SWAP"),
        Private("vllm.v1.worker.gpu_input_batch", "InputBatch.update_async_output_token_ids",
                ("self",)),
        Private(V2_PROCS, "LogitsProcessor.add_request", ("self", "req_idx", "sampling_params")),
        Private(V2_PROCS, "LogitsProcessor.apply", ("self", "logits", "ctx")),
        Private(V2_PROCS, "LogitsContext", ("expanded_idx_mapping", "idx_mapping",
                                            "idx_mapping_np", "expanded_local_pos",
                                            "input_ids", "pos")),
        Private(V2_PROCS, "LogitsProcRequestState", ("device", "max_num_reqs", "vocab_size",
                                                     "all_token_ids", "prompt_len",
                                                     "prefill_len")),
        Private("vllm.v1.kv_cache_interface", "UniformTypeKVCacheSpecs.from_specs",
                ("kv_cache_specs",)),
        Private("vllm.v1.core.kv_cache_utils", "get_kv_cache_groups",
                ("vllm_config", "kv_cache_spec")),
        Private("vllm.sampling_params", "SamplingParams.verify",  # fused/stock.py
                ("self", "model_config", "speculative_config")),
    ),
    "speculative": (  # fused/speculate.py: the fused engine's speculative mode
        Private("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample",
                ("self", "logits", "spec_decode_metadata")),
        Private("vllm.v1.worker.gpu_model_runner",
                "GPUModelRunner._get_spec_decode_draft_probs", ("self", "spec_decode_metadata")),
        Private("vllm.v1.spec_decode.llm_base_proposer",
                "SpecDecodeBaseProposer._sample_from_logits",
                ("self", "logits", "sampling_metadata")),
        Private("vllm.v1.spec_decode.metadata", "SpecDecodeMetadata",
                ("draft_token_ids", "num_draft_tokens")),
        Private("vllm.v1.outputs", "SamplerOutput", ("sampled_token_ids", "logprobs_tensors")),
        Private("vllm.v1.sample.sampler", "Sampler.gather_logprobs",
                ("logprobs", "num_logprobs", "token_ids")),
        Private("vllm.v1.sample.metadata", "SamplingMetadata",
                ("temperature", "all_greedy", "all_random", "top_p", "top_k", "generators",
                 "max_num_logprobs")),
        Private("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids"),
        Private("vllm.config.speculative", "SpeculativeConfig.draft_sample_method"),
        Private("vllm.config.speculative", "SpeculativeConfig.rejection_sample_method"),
        Private("vllm.config.speculative",
                "SpeculativeConfig.num_speculative_tokens_per_batch_size"),
    ),
    "load_theta": (  # theta_route.py, theta_worker.py: no stock fallback
        Private("vllm.model_executor.model_loader.reload.inplace", "reload_weights",
                ("vllm_config", "model", "weights_iterator", "weights_path",
                 "is_checkpoint_format")),
        Private("vllm.model_executor.model_loader.default_loader",
                "DefaultModelLoader._get_weights_iterator", ("self", "source")),
        Private("vllm.v1.engine.async_llm", "AsyncLLM.pause_generation", ("self",)),
        Private("vllm.v1.engine.async_llm", "AsyncLLM.resume_generation", ("self",)),
        Private("vllm.v1.engine.async_llm", "AsyncLLM.reset_prefix_cache",
                ("self", "reset_running_requests")),
        Private("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc",
                ("self", "method", "timeout", "args")),
    ),
}


def problems(feature: str) -> list[str]:
    """What is missing or changed among `feature`'s private names (empty: all fine)."""
    return [p for p in (entry.problem() for entry in PRIVATE[feature]) if p]


@functools.cache
def usable(feature: str) -> bool:
    """True when every private name of `feature` is as expected; else one warning, False."""
    found = problems(feature)
    if found:
        log.warning("dual_sampling: %s left stock in vLLM %s (tested on %s): %s", feature,
                    vllm_version(), PINNED_VLLM, "; ".join(found))
    return not found


def vllm_version() -> str:
    import vllm
    return getattr(vllm, "__version__", "unknown")


@functools.cache
def warn_if_unpinned() -> bool:
    """Log once when the running vLLM is not the pinned one; True when it is."""
    running = vllm_version().split("+")[0]
    if running != PINNED_VLLM:
        log.warning("dual_sampling: running vLLM %s; this package is tested on %s. Run "
                    "`python -m dual_sampling.vllm_plugin.compat` to see what it wraps.",
                    running, PINNED_VLLM)
    return running == PINNED_VLLM


if __name__ == "__main__":
    print(f"vLLM {vllm_version()} (pinned: {PINNED_VLLM})")
    for name in PRIVATE:
        found = problems(name)
        print(f"{name}: {'ok' if not found else 'MISSING: ' + '; '.join(found)}")
