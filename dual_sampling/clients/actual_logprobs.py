"""Actual-token logprobs of token-id sequences: which route reads them, and a check of the
stock route (perplexity and score modes).

Two routes give the logprob (nats) of every token after the first, given the tokens before
it, `(L-1,)` per sequence, without any top-k list:
- this package's plugin route `/v1/topk` with k = 1: one request for a batch of sequences,
  a binary reply with each actual token's float32 logprob (no JSON, no detokenising); a
  sequence must leave the one generated slot free (L < max-model-len);
- stock `/v1/completions` with `prompt_logprobs=0` (`VLLMClient.actual_token_logprobs`), one
  request per sequence, any vLLM server, L <= max-model-len; its last token is forced as the
  generated one, whose logprob is raw only under `--logprobs-mode raw_logprobs` (checked by
  `check_raw_logprobs`).
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional

import numpy as np

from dual_sampling.clients.client import TOPK_PATH, ServerInfo, VLLMClient
from dual_sampling.errors import ServerMismatchError

TOPK_ROUTE = f"{TOPK_PATH} (k=1, binary)"
STOCK_ROUTE = "/v1/completions (prompt_logprobs=0)"
# A forced token's logprob and the same token's prompt logprob come from the same logits;
# loose enough for bf16 batch noise, far tighter than a processed mode's 0.0 or a raw logit.
FORCED_LOGPROB_TOLERANCE = 0.05

Scorer = Callable[[list[list[int]], Optional[list[int]]], Awaitable[list[np.ndarray]]]
"""(token-id sequences, `rows_from` or None) -> each one's actual-token logprobs `(L-1,)`
float64, in order. With `rows_from` (one per sequence) only the rows from there on are
needed: the binary route leaves the earlier ones NaN where vLLM's prefix cache served them."""


def choose_scorer(client: VLLMClient, info: ServerInfo, max_length: int, route: str = "auto"
                  ) -> tuple[Scorer, str]:
    """The scorer for sequences of up to `max_length` tokens, and its route's name.

    `route`: `topk` (ServerMismatchError when the server lacks it or `max_length` leaves no
    generated slot), `stock`, or `auto` (topk where it can, else stock).
    """
    binary_fits = info.serves(TOPK_PATH) and max_length < info.max_model_len
    if route == "topk" and not binary_fits:
        raise ServerMismatchError(
            f"route {TOPK_PATH} was asked for, but the {client.name} server at {client.url} "
            + ("does not serve it: start it with start_vllm.sh (this package's plugin)"
               if not info.serves(TOPK_PATH) else
               f"takes at most {info.max_model_len - 1} tokens there and a sequence has "
               f"{max_length}") + "; or use the stock route (`auto` picks it by itself).")
    if route != "stock" and binary_fits:
        async def binary(sequences: list[list[int]], rows_from: Optional[list[int]] = None
                         ) -> list[np.ndarray]:
            encoded = await client.prompt_topk_encoded(sequences, 1, "fp16", rows_from)
            return [seq.actual.astype(np.float64) for seq in encoded]  # exact float32 values
        return binary, TOPK_ROUTE

    async def stock(sequences: list[list[int]], rows_from: Optional[list[int]] = None
                    ) -> list[np.ndarray]:
        return list(await asyncio.gather(*(client.actual_token_logprobs(ids)
                                           for ids in sequences)))
    return stock, STOCK_ROUTE


async def check_raw_logprobs(client: VLLMClient) -> None:
    """ServerMismatchError unless a forced token reads its raw logprob (the stock route's need)."""
    probe = await client.tokenize("Perplexity is the exponential of the mean NLL.",
                                  add_special_tokens=False)
    forced = await client.actual_token_logprobs(probe)  # (L-1,) last one forced
    prompted = await client.actual_token_logprobs(probe + probe[:1])  # (L,)
    if not abs(forced[-1] - prompted[-2]) <= FORCED_LOGPROB_TOLERANCE:
        raise ServerMismatchError(
            f"the {client.name} server at {client.url} gives a forced token logprob "
            f"{forced[-1]:.4f} where its prompt logprob is {prompted[-2]:.4f}: it does not "
            f"return raw logprobs for generated tokens. Restart it with the default "
            f"--logprobs-mode raw_logprobs.")
