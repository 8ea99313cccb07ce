"""Worker side of load_theta: new theta weights into the running model, in place.

`ThetaWorkerExtension` is mixed into vLLM's worker class (`--worker-extension-cls`, which
start_vllm.sh passes to every server; fused servers get it through FusedWorkerExtension)
and called by name through `engine_client.collective_rpc("dual_sampling_load_theta",
args=(path,))`, on every tensor-parallel rank.

Loading is vLLM's own: its default loader's weight iterator reads the checkpoint (sharded
safetensors included) and `model_loader.reload.reload_weights` puts each tensor through the
model's `load_weights` and weight loaders (tensor-parallel sharding, stacked qkv / gate_up
parameters, quantisation processing), copying into the existing parameter storage: no new
model, no second copy of the weights, the KV cache and CUDA graphs stay valid. On a fused
server only the `theta` submodule is reloaded; the target's parameters are not touched.
The caller (theta_route.py) has checked the checkpoint's shapes and paused the engine.
"""
from __future__ import annotations

import gc
import time
from typing import Any

from torch import nn

from dual_sampling.vllm_plugin.full_logits import FullLogitsWorker


def theta_module(model: nn.Module) -> nn.Module:
    """The module holding theta's weights: the fused model's `theta`, else the model
    (`get_model()` already unwraps vLLM's CUDA-graph wrappers)."""
    theta = getattr(model, "theta", None)
    return theta if isinstance(theta, nn.Module) else model


def refresh_tied_head(module: nn.Module) -> bool:
    """Rebuild the kernel form of an output head tied to the input embedding; True when the
    model has one.

    Models with tie_word_embeddings (SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B...) share one
    parameter between `model.embed_tokens` and `lm_head`. vLLM's in-place reload writes the
    new values into it, but re-processes only the layers it loaded into, and a tied head is
    never loaded: on CPU the head keeps the packed GEMM weights it made at start-up from the
    old values (`dispatch_cpu_unquantized_gemm`), so the served theta was the new body under
    the old head (logprobs off by 0.2 on the real pair; tests/test_real_fused.py). The
    head's own post-load step rebuilds them from the shared parameter (on GPU it does
    nothing: the head reads the parameter itself)."""
    config = getattr(module, "config", None)
    head = getattr(module, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if not getattr(config, "tie_word_embeddings", False) or method is None:
        return False
    method.process_weights_after_loading(head)
    return True


class ThetaWorkerExtension(FullLogitsWorker):
    """Methods vLLM adds to its worker class (`--worker-extension-cls`), called by name."""

    def dual_sampling_load_theta(self, path: str) -> dict[str, Any]:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        start = time.perf_counter()
        runner = self.model_runner
        model = runner.get_model()
        module = theta_module(model)
        loader = DefaultModelLoader(self.vllm_config.load_config)
        weights = loader._get_weights_iterator(DefaultModelLoader.Source(
            path, revision=None, prefix=""))
        with set_current_vllm_config(self.vllm_config):
            if module is model:  # a plain server: the runner's own reload (and its resets)
                runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            else:  # fused: theta's submodule only, the target's parameters untouched
                reload_weights(self.vllm_config, module, weights_iterator=weights,
                               weights_path=None, is_checkpoint_format=True)
            refresh_tied_head(module)
        del weights
        gc.collect()
        return {"load_s": time.perf_counter() - start}
