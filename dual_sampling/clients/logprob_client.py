"""Logprob routes of one server: next-token top-k, prompt logprobs, teacher top-k at every position.

Numpy arrays out, natural logs. The plugin's binary `/v1/topk` when the server has it, stock
`/v1/completions` JSON otherwise (same arrays, slower).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import numpy as np

from dual_sampling.clients.http_client import HttpClient, _field, _is_missing_route
from dual_sampling.errors import MalformedResponseError, ServerError, ServerMismatchError
from dual_sampling.wire.topk_format import (EncodedTopk, TopkFormatError, TopkResult, check_format,
                                       decode_body)

log = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"
TOPK_PATH = "/v1/topk"  # the plugin's teacher top-k route (dual_sampling/vllm_plugin/topk.py)


class LogprobClient(HttpClient):
    """The logprob requests of `VLLMClient` (which adds server facts and tokenisation)."""

    # -- logprobs ------------------------------------------------------------------------
    async def next_token_topk(self, prompts: list[list[int]], k: int
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k next-token ids and logprobs (nats) after each token-id prompt.

        One `/v1/completions` request for the whole batch. Returns `ids (B, k) int64` and
        `logp (B, k) float64`, each row sorted by decreasing logprob.
        """
        reply = await self.post("/v1/completions", {
            "prompt": prompts, "max_tokens": 1, "logprobs": k, "temperature": 0.0,
            "return_tokens_as_token_ids": True, "skip_special_tokens": False})
        where = self._where("POST", "/v1/completions")
        choices = _field(reply, "choices", where)
        if len(choices) != len(prompts):
            raise MalformedResponseError(f"{where} returned {len(choices)} choices for "
                                         f"{len(prompts)} prompts.")
        ids = np.empty((len(prompts), k), dtype=np.int64)  # (B, k)
        logp = np.empty((len(prompts), k), dtype=np.float64)  # (B, k)
        for choice in choices:
            try:
                row = int(choice.get("index", 0))
                top = choice["logprobs"]["top_logprobs"][0]
                # vLLM adds the token it sampled when it is outside the top k: keep the top k.
                best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
                ids[row] = [int(key[len(TOKEN_ID_PREFIX):]) for key, _ in best]
                logp[row] = [max(value, -np.inf) for _, value in best]
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise MalformedResponseError(
                    f"{where} returned a choice without top-k logprobs "
                    f"({str(choice)[:200]}).") from exc
        return ids, logp

    async def prompt_logprobs(self, token_ids: list[int], k: int
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stock vLLM `prompt_logprobs` for one token-id sequence (slow JSON path).

        Row j scores token j+1 given tokens 0..j. Returns `actual (L-1,)`, the logprob of
        the actual next token, and `ids (L-1, k) int64`, `logp (L-1, k)`, the top k sorted
        by decreasing logprob (k = 0 gives empty top-k arrays).
        """
        reply = await self.post("/v1/completions", {
            "prompt": token_ids, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0,
            "return_tokens_as_token_ids": True})
        where = self._where("POST", "/v1/completions")
        rows = _field(reply, "choices", where)[0].get("prompt_logprobs") or []
        n = len(token_ids) - 1
        if len(rows) != len(token_ids):
            raise MalformedResponseError(f"{where} returned {len(rows)} prompt_logprobs rows "
                                         f"for a {len(token_ids)}-token prompt.")
        actual = np.empty(n, dtype=np.float64)  # (L-1,)
        ids = np.full((n, k), -1, dtype=np.int64)  # (L-1, k)
        logp = np.full((n, k), -np.inf, dtype=np.float64)  # (L-1, k)
        for j, row in enumerate(rows[1:]):
            try:
                actual[j] = row[str(token_ids[j + 1])]["logprob"]
                top = sorted(((v["logprob"], int(t)) for t, v in row.items() if v["rank"] <= k),
                             reverse=True)[:k]
            except (KeyError, TypeError, ValueError) as exc:
                raise MalformedResponseError(f"{where}: prompt_logprobs row {j + 1} unreadable "
                                             f"({str(row)[:200]}).") from exc
            if top:
                logp[j, :len(top)], ids[j, :len(top)] = zip(*top)
        return actual, ids, logp

    async def check_top_k(self, k: int) -> None:
        """Fail early, naming the server and its limit, when it cannot return k logprobs."""
        try:
            await self.next_token_topk([[0]], k)
        except ServerError as exc:
            if "logprobs" in str(exc):
                raise ServerMismatchError(
                    f"{self.name} server at {self.url} cannot return top_k={k} logprobs: {exc}. "
                    f"Restart it with `--max-logprobs {k}` or more (start_vllm.sh "
                    f"--max-logprobs), or lower top_k.") from exc
            raise

    # -- actual-token logprobs (perplexity) ---------------------------------------------
    async def actual_token_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """Logprob (nats) of each token after the first given the tokens before it, `(L-1,)`.

        Stock `/v1/completions` with `prompt_logprobs=0`: only the actual tokens' logprobs
        travel, never top-k lists. The last token is not sent as prompt but forced as the one
        generated token (`allowed_token_ids`) and read from `logprobs=0`, so an L-token
        sequence needs only L <= max-model-len (vLLM wants prompt + 1 generated token to fit).
        That value is the raw logprob only under the server's default `--logprobs-mode
        raw_logprobs` (a processed mode reads 0.0 for a forced token).
        """
        if len(token_ids) < 2:
            raise ValueError(f"need at least 2 token ids to score, got {len(token_ids)}")
        prompt, last = token_ids[:-1], token_ids[-1]
        reply = await self.post("/v1/completions", {
            "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
            "logprobs": 0, "allowed_token_ids": [last], "return_tokens_as_token_ids": True})
        where = self._where("POST", "/v1/completions")
        choice = _field(reply, "choices", where)[0]
        try:
            rows = choice["prompt_logprobs"][1:]
            logp = [row[str(token)]["logprob"] for row, token in zip(rows, prompt[1:])]
            generated = choice["logprobs"]
            if len(rows) != len(prompt) - 1 or generated["tokens"] != [f"{TOKEN_ID_PREFIX}{last}"]:
                raise ValueError(f"{len(rows)} prompt rows for {len(prompt)} prompt tokens, "
                                 f"generated {generated['tokens']} instead of {last}")
            logp.append(generated["token_logprobs"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MalformedResponseError(
                f"{where}: no actual-token logprobs in the reply ({exc}; "
                f"{str(choice)[:200]}).") from exc
        return np.asarray(logp, dtype=np.float64)  # (L-1,)

    # -- teacher top-k at every position -------------------------------------------------
    async def prompt_topk(self, sequences: list[list[int]], k: int, fmt: str = "int8"
                          ) -> list[TopkResult]:
        """Top-k ids and logprobs at every position of each token-id sequence, decoded.

        Per sequence of L tokens: `ids (L-1, k) int64`, `logp (L-1, k) float32` (by decreasing
        logprob, within the `fmt` error bound of dual_sampling.wire.topk_format) and `actual (L-1,)`
        float32. Uses this package's `/v1/topk`; on a server without it, falls back (warning
        once) to stock `prompt_logprobs`, which gives the same arrays, only slower.
        """
        return [seq.decode() for seq in await self.prompt_topk_encoded(sequences, k, fmt)]

    async def prompt_topk_encoded(self, sequences: list[list[int]], k: int, fmt: str = "int8",
                                  rows_from: Optional[list[int]] = None) -> list[EncodedTopk]:
        """As `prompt_topk`, in the stored form (quantised logprobs) that the cache keeps.

        `rows_from` (one per sequence): only rows from there on are needed; earlier ones may
        come back NaN, and the server may serve shared prefixes from its prefix cache.
        """
        check_format(fmt)
        if not getattr(self, "_topk_route_missing", False):
            request = {"sequences": sequences, "k": k, "format": fmt}
            if rows_from is not None:
                request["rows_from"] = rows_from
            try:
                body, _ = await self.request("POST", TOPK_PATH, request, want="bytes")
            except ServerError as exc:
                if not _is_missing_route(exc):
                    raise
                self._topk_route_missing = True
                log.warning("%s: no such route (the dual_sampling plugin is not loaded); "
                            "falling back to stock prompt_logprobs, much slower. Start the "
                            "server with ./start_vllm.sh for the fast route.",
                            self._where("POST", TOPK_PATH))
            else:
                return self._read_topk_body(body, len(sequences), k, fmt)
        return list(await asyncio.gather(*(self._stock_topk(ids, k, fmt) for ids in sequences)))

    def _read_topk_body(self, body: bytes, n_seq: int, k: int, fmt: str) -> list[EncodedTopk]:
        where = self._where("POST", TOPK_PATH)
        try:
            header, encoded = decode_body(body)
        except TopkFormatError as exc:
            raise MalformedResponseError(f"{where} answered with an unreadable body: {exc}"
                                         ) from exc
        if (header.n_seq, header.k, header.fmt) != (n_seq, k, fmt):
            raise MalformedResponseError(
                f"{where} answered {header.n_seq} sequences, k={header.k}, {header.fmt} for a "
                f"request of {n_seq} sequences, k={k}, {fmt}.")
        return encoded

    async def _stock_topk(self, ids: list[int], k: int, fmt: str) -> EncodedTopk:
        actual, top_ids, logp = await self.prompt_logprobs(ids, k)
        return EncodedTopk.encode(top_ids, logp, actual, fmt, np.dtype("<i4"))
