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


def theta_module(model: nn.Module) -> nn.Module:
    """The module holding theta's weights: the fused model's `theta`, else the model
    (`get_model()` already unwraps vLLM's CUDA-graph wrappers)."""
    theta = getattr(model, "theta", None)
    return theta if isinstance(theta, nn.Module) else model


class ThetaWorkerExtension:
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
        del weights
        gc.collect()
        return {"load_s": time.perf_counter() - start}
