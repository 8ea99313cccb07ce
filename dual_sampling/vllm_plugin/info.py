"""`GET /v1/dual_sampling/info`: the facts a coordinator checks before the first token.

Stock vLLM does not say which ids end a sequence; this route reads them from the served
model's generation config (falling back to its tokenizer), with the vocabulary size and
the server's limits, `routes`: the paths this plugin serves (a client picks the session
transport when `/v1/dual_sampling/session` is among them), `fused`: whether the server
serves both models in one engine (start_vllm.sh --fused; the fused transport), and
`checkpoints`: each served model's path and fingerprint (fingerprint.py), keyed `theta` and
`target` on a fused server and `model` on the others; theta's is the checkpoint served now
(after a load_theta, the loaded one). Sample runs record them to refuse a resume on other
models.
"""
from __future__ import annotations

import asyncio
import importlib
from typing import Any

from fastapi import APIRouter, Request

from dual_sampling.vllm_plugin import route_modules
from dual_sampling.vllm_plugin.fingerprint import fingerprint
from dual_sampling.vllm_plugin.full_logits import keeps_full_logits
from dual_sampling.vllm_plugin.fused.route import is_fused
from dual_sampling.vllm_plugin.fused.setup import CONFIG_KEY
from dual_sampling.vllm_plugin.theta_route import state_of

router = APIRouter()


def _as_list(value: object) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def plugin_routes() -> list[str]:
    package = __name__.rsplit(".", 1)[0]
    return sorted(route.path for module in route_modules()
                  for route in importlib.import_module(f"{package}.{module}").router.routes)


@router.get("/v1/dual_sampling/info")
async def info(request: Request) -> dict:
    engine = request.app.state.engine_client
    model_config = engine.model_config
    tokenizer = engine.get_tokenizer()
    generation = model_config.try_get_generation_config() or {}
    eos = _as_list(generation.get("eos_token_id")) or _as_list(tokenizer.eos_token_id)
    return {
        "model": model_config.served_model_name,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": eos,
        "vocab_size": model_config.get_vocab_size(),
        "max_model_len": model_config.max_model_len,
        "max_logprobs": model_config.max_logprobs,
        "routes": plugin_routes(),
        "fused": is_fused(engine),
        "full_logits": keeps_full_logits(model_config),
        "checkpoints": await asyncio.to_thread(checkpoints, request.app, model_config),
        **theta_facts(request.app),
    }


def checkpoints(app: object, model_config: Any) -> dict[str, dict[str, Any]]:
    """`{role: {"path", "fingerprint"}}` of the models this server serves now."""
    state = state_of(app)
    served = state.path if state is not None else model_config.model
    spec = getattr(model_config.hf_config, CONFIG_KEY, None)
    paths = ({"theta": served, "target": spec["target"]} if isinstance(spec, dict)
             else {"model": served})
    return {role: {"path": str(path), "fingerprint": fingerprint(str(path))}
            for role, path in paths.items()}


def theta_facts(app: object) -> dict:
    """The served theta's version and checkpoint (theta_route.py), for records."""
    state = state_of(app)
    return {} if state is None else {"theta_version": state.version, "theta_path": state.path}
