"""`POST /v1/dual_sampling/fused/generate`: whole completions from q* with exact diagnostics.

Only on a fused server (start_vllm.sh --fused); elsewhere it answers 409. The request and
reply are fused_format.py's (the contract the client shares).

Each prompt becomes one ordinary engine request (vLLM batches them with everything else in
flight), tagged in `extra_args` so the logits processor (fused/sampler.py) samples its tokens
from q* with the prompt's seed and records each token's diagnostics in the worker. When a
request finishes, its record, cut to the completion's length, comes back through one
`collective_rpc` for all the requests that finished meanwhile.

`GET /v1/dual_sampling/fused/counters`: the worker's counters (steps, seconds solving
alpha*, solver iterations) for benchmarks.

`GET /v1/dual_sampling/fused/engine`: how the engine runs the fused model (model runner V1
or V2, async scheduling, the KV-cache groups with their bytes per token and the token
capacity), read once at start-up by `check_engine`, which refuses to serve unless the
engine made one KV-cache group (fused/setup.py's check, seen from the engine's side).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any, Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, SamplingParams

from dual_sampling.maths.mixture import ALPHA_METHODS
from dual_sampling.vllm_plugin.fused import stock
from dual_sampling.vllm_plugin.fused.setup import ARCHITECTURE
from dual_sampling.vllm_plugin.replies import error, gather_or_error
from dual_sampling.wire.fused_format import (COUNTERS_PATH, ENGINE_PATH, GENERATE_PATH,
                                             TOKEN_FIELDS, TokenArgs, TokenArgsError)


router = APIRouter()
log = logging.getLogger("vllm.dual_sampling.fused")  # under vLLM's handlers
stock.install()  # stock requests: what a fused server cannot apply is a 400 (stock.py)


class FusedRequest(BaseModel):
    """The body; a value out of range is a 400 naming the field (vLLM's validation handler),
    on the speculative engine too, which has no logits processor to check it."""

    prompts: list[list[int]]
    seeds: list[int]
    max_tokens: int = Field(ge=1)
    alpha: Optional[float] = Field(default=None, ge=0.0, le=1.0)  # None: alpha* per token
    temperature: float = Field(default=1.0, ge=0.0)  # 0: argmax of q*
    stop: list[str] = []
    ignore_eos: bool = False
    alpha_method: Literal[ALPHA_METHODS] = "kl_symmetry"  # kernels.solve_rules
    alpha_min: float = Field(default=0.0, ge=0.0, le=1.0)
    alpha_max: float = Field(default=1.0, ge=0.0, le=1.0)


def is_fused(engine: Any) -> bool:
    return ARCHITECTURE in (engine.model_config.architectures or [])


class FusedEngineError(RuntimeError):
    """The engine did not lay the fused model out as this package needs."""


async def check_engine(engine: Any) -> dict[str, Any]:
    """The worker's `dual_sampling_engine` summary; FusedEngineError unless one KV group."""
    summary = (await engine.collective_rpc("dual_sampling_engine"))[0]
    groups = summary["kv_cache"]["groups"]
    if len(groups) != 1:
        raise FusedEngineError(
            f"the fused engine made {len(groups)} KV-cache groups ({groups}), not one: "
            f"vLLM could not hold both models' attention layers in one block table. Serve "
            f"the pair on two servers (sample.transport=session) and report the pair.")
    log.info("dual_sampling fused engine: model runner %s, async scheduling %s, KV cache "
             "%d bytes per token over %d layers, %s tokens", summary["model_runner"],
             summary["async_scheduling"], groups[0]["bytes_per_token"], groups[0]["layers"],
             summary["kv_cache"]["tokens"])
    return summary


class _Diagnostics:
    """Pops finished requests' records from the worker, one RPC for all waiting at once."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.waiting: dict[str, tuple[int, asyncio.Future]] = {}
        self.task: Optional[asyncio.Task] = None

    async def pop(self, tag: str, length: int) -> Optional[dict[str, list]]:
        """The record of `tag`'s first `length` tokens (None: the worker has none)."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[tag] = (length, future)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, {}
            try:
                replies = await self.engine.collective_rpc(
                    "dual_sampling_pop_diagnostics",
                    args=({tag: length for tag, (length, _) in batch.items()},))
            except Exception as exc:  # every waiting request fails with the cause
                for _, future in batch.values():
                    future.set_exception(exc)
                continue
            for tag, (_, future) in batch.items():
                future.set_result(replies[0].get(tag))


def is_speculative(engine: Any) -> bool:
    """Whether the engine runs the fused model's speculative mode (fused/speculate.py)."""
    return getattr(getattr(engine, "vllm_config", None), "speculative_config", None) is not None


class _Refused(Exception):
    """A request this route refuses with HTTP 400."""


def _check(body: FusedRequest, vocab_size: int) -> TokenArgs:
    """The request's TokenArgs (tag and seed filled per prompt later); _Refused naming what is
    wrong."""
    try:
        args = TokenArgs(tag=None, seed=0, alpha=body.alpha, temperature=body.temperature,
                         alpha_method=body.alpha_method, alpha_min=body.alpha_min,
                         alpha_max=body.alpha_max)
    except TokenArgsError as exc:
        raise _Refused(str(exc)) from None
    if not body.prompts or len(body.seeds) != len(body.prompts):
        raise _Refused(f"give one seed per prompt: {len(body.prompts)} prompts, "
                       f"{len(body.seeds)} seeds")
    for index, ids in enumerate(body.prompts):
        if not ids or min(ids) < 0 or max(ids) >= vocab_size:
            raise _Refused(f"prompt {index} is empty or holds an id outside [0, {vocab_size})")
    return args


async def _complete(engine: Any, diagnostics: _Diagnostics, ids: list[int], seed: int,
                    body: FusedRequest, args: TokenArgs) -> dict[str, Any]:
    tag = f"fused-{uuid.uuid4().hex}"
    # the token is forced (fused/sampler.py) or drawn by speculate.py; a speculative engine
    # lets theta draft at random only for requests vLLM does not take for greedy ones
    params = SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature if is_speculative(engine)
        else 0.0, stop=body.stop or None,
        detokenize=bool(body.stop), ignore_eos=body.ignore_eos,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=dataclasses.replace(args, tag=tag, seed=seed).to_extra())
    final = None
    async for output in engine.generate({"prompt_token_ids": ids}, params, request_id=tag):
        final = output
    completion = final.outputs[0]
    token_ids = list(completion.token_ids)
    record = await diagnostics.pop(tag, len(token_ids))
    if record is None or record["token"] != token_ids:
        got = None if record is None else record["token"]
        raise RuntimeError(f"{tag}: the worker's record of the sampled tokens ({got}) does not "
                           f"match the engine's output ({token_ids}): is --logits-processors "
                           f"set (start_vllm.sh --fused sets it)?")
    return {"token_ids": token_ids, "finish_reason": completion.finish_reason,
            **{name: record[name] for name in TOKEN_FIELDS}}


@router.post(GENERATE_PATH)
async def generate(body: FusedRequest, request: Request) -> JSONResponse:
    engine = request.app.state.engine_client
    if not is_fused(engine):
        return error(409, f"this server does not serve the fused model ({ARCHITECTURE}): "
                           f"start one with ./start_vllm.sh --fused --theta A --target B")
    try:
        args = _check(body, engine.model_config.get_vocab_size())
    except _Refused as exc:
        return error(400, str(exc))
    state = request.app.state
    if getattr(state, "dual_sampling_fused", None) is None:
        state.dual_sampling_fused = _Diagnostics(engine)
    tasks = [asyncio.ensure_future(_complete(engine, state.dual_sampling_fused, ids, seed, body,
                                             args))
             for ids, seed in zip(body.prompts, body.seeds)]
    results = await gather_or_error(tasks, GENERATE_PATH,
                                    refused=(VLLMClientError, ValueError))
    if isinstance(results, JSONResponse):
        return results
    return JSONResponse({"results": results})


@router.get(COUNTERS_PATH)
async def counters(request: Request) -> JSONResponse:
    engine = request.app.state.engine_client
    if not is_fused(engine):
        return error(409, "this server does not serve the fused model")
    return JSONResponse((await engine.collective_rpc("dual_sampling_counters"))[0])


@router.get(ENGINE_PATH)
async def engine_summary(request: Request) -> JSONResponse:
    summary = getattr(request.app.state, "dual_sampling_engine", None)
    if summary is None:
        return error(409, "this server does not serve the fused model")
    return JSONResponse(summary)
