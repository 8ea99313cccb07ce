"""`POST /v1/topk`: a teacher's top-k logprobs at every position of token-id sequences.

Request JSON:
    {"sequences": [[ids...], ...], "k": 128, "format": "int8" | "fp16" | "bf16",
     "response": "binary" | "json", "rows_from": [r, ...] (optional)}
`format` defaults to int8, `response` to binary. The binary body (content type
`application/x-dual-sampling-topk; version=1`) and the error bound of each format are
documented in `dual_sampling/wire/topk_format.py`; the JSON form (for debugging) holds the same
decoded values: `{"k", "format", "vocab_size", "sequences": [{"ids", "logprobs", "actual"}]}`.

Each sequence is one engine request (max_tokens=1, prompt_logprobs=k), all in flight at
once. `detokenize=False` skips decoding every top-k entry (three quarters of the stock
path's cost) and `flat_logprobs=True` makes vLLM keep each request's prompt logprobs as flat
lists: position 0 is empty and every later position holds k+1 entries, the actual next
token first, then the top k by decreasing logprob (`append_logprobs_for_next_position` in
vllm/logprobs.py), so the lists reshape straight to (L-1, k+1) with no per-entry objects.
Better still, raw_logprobs.py has the API server keep the engine's arrays as they arrive,
with no per-position lists at all (the flat lists remain the fallback).

`rows_from` (one row per sequence, e.g. the first completion row in score mode) says which
rows the caller needs; the rows before it may come back NaN (ids 0). vLLM never reads its
prefix cache for a request with prompt logprobs unless told it may
(`SamplingParams.skip_reading_prefix_cache`, whose default skips because cached positions
get no prompt logprobs); with `rows_from` the route tells it so, and a sequence whose first
`rows_from + 1` tokens equal an earlier sequence's in the request starts once that one is
done, so a prompt shared by several completions is computed once when it spans whole KV
blocks. A sequence that found more of itself cached than `rows_from` allows (its needed
rows were not computed) is scored again without the cache.

Bad requests get a 4xx JSON error naming the sequence and the limit: k over the server's
--max-logprobs, an empty batch or sequence, an id outside the vocabulary, a sequence that
leaves no room for the one generated token within --max-model-len, an unknown format (422).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal, Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from vllm.sampling_params import RequestOutputKind, SamplingParams

from dual_sampling.vllm_plugin.raw_logprobs import RAW_KEY, RawPromptLogprobs, install
from dual_sampling.vllm_plugin.replies import error, gather_or_error
from dual_sampling.wire.topk_format import (CONTENT_TYPE, EncodedTopk, encode_body,
                                            id_dtype_for_vocab)

router = APIRouter()
install()  # prompt logprobs as arrays for this route (raw_logprobs.py)


class TopkRequest(BaseModel):
    sequences: list[list[int]]
    k: int
    format: Literal["int8", "fp16", "bf16"] = "int8"
    response: Literal["binary", "json"] = "binary"
    rows_from: Optional[list[int]] = None


class BadTopkRequest(Exception):
    """A request this route refuses with HTTP 400."""


def _check(body: TopkRequest, vocab_size: int, max_logprobs: int, max_model_len: int) -> None:
    if max_logprobs == -1:
        max_logprobs = vocab_size
    if not 1 <= body.k <= max_logprobs:
        raise BadTopkRequest(f"k={body.k} is outside [1, {max_logprobs}]: this server allows "
                             f"at most --max-logprobs={max_logprobs}; restart it with a larger "
                             f"--max-logprobs or ask for fewer.")
    if not body.sequences:
        raise BadTopkRequest("`sequences` is empty: send at least one token-id sequence.")
    if body.rows_from is not None and len(body.rows_from) != len(body.sequences):
        raise BadTopkRequest(f"`rows_from` has {len(body.rows_from)} entries for "
                             f"{len(body.sequences)} sequences: give one per sequence.")
    for index, seq in enumerate(body.sequences):
        if not seq:
            raise BadTopkRequest(f"sequence {index} is empty: every sequence needs >= 1 token.")
        if len(seq) >= max_model_len:
            raise BadTopkRequest(
                f"sequence {index} has {len(seq)} tokens; with --max-model-len={max_model_len} "
                f"this server scores at most {max_model_len - 1} (one slot stays for the "
                f"generated token): truncate it.")
        if body.rows_from is not None and not 0 <= body.rows_from[index] < len(seq) - 1:
            raise BadTopkRequest(f"rows_from[{index}] = {body.rows_from[index]} is outside the "
                                 f"sequence's rows [0, {len(seq) - 1}).")
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= vocab_size:
            raise BadTopkRequest(f"sequence {index} holds token id {lo if lo < 0 else hi}, "
                                 f"outside the vocabulary [0, {vocab_size}).")


async def _score(engine: Any, ids: list[int], params: SamplingParams, request_id: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Flat prompt logprobs of one sequence: `token_ids (L-1, k+1)`, `logprobs (L-1, k+1)`;
    rows before the prefix-cache hit (only where `params` reads the cache) are NaN, ids 0."""
    final = None
    async for output in engine.generate({"prompt_token_ids": ids}, params,
                                        request_id=request_id):
        final = output
    flat = final.prompt_logprobs
    n, width = len(ids) - 1, params.prompt_logprobs + 1
    if isinstance(flat, RawPromptLogprobs):
        token_ids, logprobs = flat.arrays()
    else:  # raw_logprobs.install() did not apply to this vLLM
        token_ids = np.asarray(flat.token_ids, dtype=np.int64)
        logprobs = np.asarray(flat.logprobs, dtype=np.float32)
    if token_ids.size != n * width:
        raise RuntimeError(f"{request_id}: the engine returned {token_ids.size} prompt logprobs "
                           f"for {n} positions x (k+1)={width}")
    token_ids, logprobs = token_ids.reshape(n, width), logprobs.reshape(n, width)
    cached = final.num_cached_tokens or 0  # rows before it were never computed
    token_ids[:cached], logprobs[:cached] = 0, np.nan
    if not np.array_equal(token_ids[cached:, 0], ids[cached + 1:]):
        raise RuntimeError(f"{request_id}: column 0 of the flat prompt logprobs is not the "
                           f"actual next token; this vLLM version lays them out differently")
    return token_ids, logprobs


async def _score_from(engine: Any, ids: list[int], rows_from: int, params: SamplingParams,
                      cached_params: SamplingParams, request_id: str,
                      after: Optional[asyncio.Future]) -> tuple[np.ndarray, np.ndarray]:
    """`_score` reading the prefix cache once `after` (the sequence sharing this one's first
    rows_from + 1 tokens) is done; again without the cache if a needed row was cached."""
    if after is not None:
        await asyncio.wait([after])
    token_ids, logprobs = await _score(engine, ids, cached_params, request_id)
    if np.isnan(logprobs[rows_from:, 0]).any():
        token_ids, logprobs = await _score(engine, ids, params, request_id + "-uncached")
    return token_ids, logprobs


@router.post("/v1/topk")
async def topk(body: TopkRequest, request: Request) -> Response:
    engine = request.app.state.engine_client
    model_config = engine.model_config
    vocab_size = model_config.get_vocab_size()
    try:
        _check(body, vocab_size, model_config.max_logprobs, model_config.max_model_len)
    except BadTopkRequest as exc:
        return error(400, str(exc))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=body.k,
                            detokenize=False, flat_logprobs=True,
                            output_kind=RequestOutputKind.FINAL_ONLY,
                            extra_args={RAW_KEY: True})
    cached_params = params.clone()
    cached_params.skip_reading_prefix_cache = False
    batch = uuid.uuid4().hex
    tasks, firsts = [], {}
    for i, ids in enumerate(body.sequences):
        request_id = f"topk-{batch}-{i}"
        if body.rows_from is None:
            tasks.append(asyncio.ensure_future(_score(engine, ids, params, request_id)))
            continue
        prefix = tuple(ids[:body.rows_from[i] + 1])
        tasks.append(asyncio.ensure_future(_score_from(
            engine, ids, body.rows_from[i], params, cached_params, request_id,
            firsts.get(prefix))))
        firsts.setdefault(prefix, tasks[-1])
    scored = await gather_or_error(tasks, "/v1/topk")
    if isinstance(scored, JSONResponse):
        return scored
    id_dtype = id_dtype_for_vocab(vocab_size)
    encoded = [EncodedTopk.encode(token_ids[:, 1:], logprobs[:, 1:], logprobs[:, 0],
                                  body.format, id_dtype) for token_ids, logprobs in scored]
    if body.response == "json":
        return JSONResponse({
            "k": body.k, "format": body.format, "vocab_size": vocab_size,
            "sequences": [{"ids": seq.ids.tolist(), "logprobs": _json_floats(seq.logprobs()),
                           "actual": seq.actual.tolist()} for seq in encoded]})
    return Response(encode_body(encoded, body.k, body.format, vocab_size),
                    media_type=CONTENT_TYPE)


def _json_floats(values: np.ndarray) -> list:
    """-inf is not JSON: it becomes null."""
    if np.isfinite(values).all():
        return values.tolist()
    return np.where(np.isfinite(values), values.astype(object), None).tolist()
