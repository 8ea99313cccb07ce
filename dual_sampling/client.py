"""One vLLM OpenAI-compatible server over HTTP: pooled requests, retries, start-up guards.

Retry policy (anchored on the OpenAI Python client's): connection errors, timeouts, 408,
429 and 5xx are retried `max_retries` times (2 by default) with exponential backoff from
0.5 s doubling to at most 8 s, plus up to 25% jitter; any other 4xx and any malformed 2xx
body fail at once. Every error that reaches the caller is a `ServerError` naming the
server, the request and what to do.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp
import numpy as np
from tenacity import (AsyncRetrying, RetryError, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from dual_sampling.errors import MalformedResponseError, ServerError, ServerMismatchError
from dual_sampling.topk_format import (EncodedTopk, TopkFormatError, TopkResult, check_format,
                                       decode_body)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
TOKEN_ID_PREFIX = "token_id:"
INFO_PATH = "/v1/dual_sampling/info"  # this package's plugin (dual_sampling/vllm_plugin/info.py)
TOPK_PATH = "/v1/topk"  # the plugin's teacher top-k route (dual_sampling/vllm_plugin/topk.py)


class _RetryableError(Exception):
    """A transient failure the retry policy retries; wraps the cause for the final message."""


@dataclass(frozen=True)
class ServerInfo:
    """What a server says about itself, read once before any generation."""

    url: str
    model: str
    max_model_len: int
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    vocab_size: Optional[int]
    has_plugin: bool
    routes: tuple[str, ...] = ()  # the paths this package's plugin serves there
    fused: bool = False  # serves theta and target in one engine (start_vllm.sh --fused)

    def serves(self, path: str) -> bool:
        return path in self.routes


class VLLMClient:
    """Async client for one server. Use as `async with VLLMClient(url, name=...) as c:`."""

    def __init__(self, url: str, *, name: str = "server", model: Optional[str] = None,
                 timeout_s: float = 120.0, max_retries: int = 2, max_connections: int = 64,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 8.0) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._max_connections = max_connections
        self._session: Optional[aiohttp.ClientSession] = None

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> "VLLMClient":
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=3.0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _where(self, method: str, path: str) -> str:
        return f"{self.name} server at {self.url} ({method} {path})"

    # -- raw requests with the retry policy ---------------------------------------------
    async def _once(self, method: str, path: str, body: Any, want: str) -> Any:
        assert self._session is not None, "use `async with VLLMClient(...)`"
        try:
            async with self._session.request(method, self.url + path, json=body) as resp:
                payload = await resp.read()
                if resp.status in RETRY_STATUSES:
                    raise _RetryableError(f"HTTP {resp.status}: {payload[:300]!r}")
                if resp.status >= 400:
                    raise ServerError(
                        f"{self._where(method, path)} refused the request with HTTP "
                        f"{resp.status}: {payload[:500].decode(errors='replace')}")
                if want == "bytes":
                    return payload, resp.headers
                try:
                    return json.loads(payload)
                except ValueError as exc:
                    raise MalformedResponseError(
                        f"{self._where(method, path)} answered HTTP {resp.status} with a body "
                        f"that is not JSON ({payload[:200]!r}). Is this URL a vLLM server?"
                    ) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                asyncio.TimeoutError) as exc:
            raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc

    async def request(self, method: str, path: str, body: Any = None, *,
                      want: str = "json", max_retries: Optional[int] = None) -> Any:
        """One request under the retry policy; returns parsed JSON or (bytes, headers)."""
        retries = self.max_retries if max_retries is None else max_retries
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retries + 1),
            wait=wait_exponential_jitter(multiplier=self.backoff_initial_s, exp_base=2,
                                         max=self.backoff_max_s,
                                         jitter=self.backoff_initial_s / 4),
            retry=retry_if_exception(lambda e: isinstance(e, _RetryableError)),
            before_sleep=lambda rs: log.warning(
                "%s: attempt %d failed (%s); retrying", self._where(method, path),
                rs.attempt_number, rs.outcome.exception() if rs.outcome else "?"),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(method, path, body, want)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise ServerError(
                f"{self._where(method, path)} failed after {retries + 1} attempt(s): {cause}. "
                f"Check that the server is up (`./start_vllm.sh` prints its URL and log), "
                f"reachable from here, and not overloaded; raise `timeout_s`/`max_retries` "
                f"for slow servers.") from cause
        raise AssertionError("unreachable")

    async def post(self, path: str, body: Any) -> Any:
        return await self.request("POST", path, {"model": self.model, **body})

    # -- server facts --------------------------------------------------------------------
    async def describe(self) -> ServerInfo:
        """Read model name, limits and special-token ids; fill in `self.model`."""
        models = await self.request("GET", "/v1/models")
        try:
            entries = models["data"]
            served = [m["id"] for m in entries]
        except (KeyError, TypeError) as exc:
            raise MalformedResponseError(
                f"{self._where('GET', '/v1/models')} answered {str(models)[:200]}: "
                f"no model list. Is this URL a vLLM server?") from exc
        if self.model is None:
            self.model = served[0]
        elif self.model not in served:
            raise ServerMismatchError(
                f"{self.name} server at {self.url} serves {served}, not {self.model!r}: "
                f"fix `{self.name}.model` or point `{self.name}.url` at the right server.")
        entry = entries[served.index(self.model)]
        max_model_len = int(entry.get("max_model_len") or 0)
        info = await self._special_tokens()
        return ServerInfo(url=self.url, model=self.model, max_model_len=max_model_len, **info)

    async def _special_tokens(self) -> dict[str, Any]:
        """BOS/EOS ids and vocab size: from this package's plugin route when the server has it,
        otherwise from vLLM's `/tokenizer_info` (start the server with
        `--enable-tokenizer-info-endpoint`; start_vllm.sh does)."""
        try:
            facts = await self.request("GET", INFO_PATH, max_retries=0)
            return {"bos_token_id": facts["bos_token_id"],
                    "eos_token_ids": tuple(facts["eos_token_ids"]),
                    "vocab_size": facts["vocab_size"], "has_plugin": True,
                    "routes": tuple(facts.get("routes", ())),
                    "fused": bool(facts.get("fused", False))}
        except ServerError:
            pass
        try:
            tok = await self.request("GET", "/tokenizer_info", max_retries=0)
        except ServerError as exc:
            raise ServerMismatchError(
                f"{self.name} server at {self.url} tells neither its EOS id nor its vocab: "
                f"start it with this package's plugin (`./start_vllm.sh`) or with vLLM's "
                f"`--enable-tokenizer-info-endpoint`.") from exc
        bos = await self._token_id(tok.get("bos_token"))
        eos = await self._token_id(tok.get("eos_token"))
        return {"bos_token_id": bos, "eos_token_ids": () if eos is None else (eos,),
                "vocab_size": tok.get("vocab_size"), "has_plugin": False}

    async def _token_id(self, token: Any) -> Optional[int]:
        if isinstance(token, dict):
            token = token.get("content")
        if not token:
            return None
        ids = await self.tokenize(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        reply = await self.post("/tokenize", {"prompt": text,
                                             "add_special_tokens": add_special_tokens})
        return _field(reply, "tokens", self._where("POST", "/tokenize"))

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render chat `messages` with the served model's chat template, then tokenise."""
        reply = await self.post("/tokenize", {"messages": messages,
                                             "add_generation_prompt": True,
                                             "add_special_tokens": False})
        return _field(reply, "tokens", self._where("POST", "/tokenize"))

    async def detokenize(self, token_ids: list[int]) -> str:
        reply = await self.post("/detokenize", {"tokens": token_ids})
        return _field(reply, "prompt", self._where("POST", "/detokenize"))

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
        logprob, within the `fmt` error bound of dual_sampling.topk_format) and `actual (L-1,)`
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


def _field(reply: Any, key: str, where: str) -> Any:
    try:
        return reply[key]
    except (KeyError, TypeError) as exc:
        raise MalformedResponseError(f"{where} answered without `{key}`: {str(reply)[:200]}"
                                     ) from exc


async def check_same_tokenizer(a: VLLMClient, info_a: ServerInfo, b: VLLMClient,
                               info_b: ServerInfo, probe: str = "Hello, world! 123 <s> ünï") -> None:
    """Two servers must tokenise alike: same vocab size, BOS/EOS ids and ids for a probe."""
    ids_a, ids_b = await asyncio.gather(a.tokenize(probe), b.tokenize(probe))
    problems = []
    if info_a.vocab_size != info_b.vocab_size:
        problems.append(f"vocab size {info_a.vocab_size} vs {info_b.vocab_size}")
    if info_a.bos_token_id != info_b.bos_token_id:
        problems.append(f"BOS id {info_a.bos_token_id} vs {info_b.bos_token_id}")
    if set(info_a.eos_token_ids) != set(info_b.eos_token_ids):
        problems.append(f"EOS ids {info_a.eos_token_ids} vs {info_b.eos_token_ids}")
    if ids_a != ids_b:
        problems.append(f"ids for {probe!r}: {ids_a[:12]} vs {ids_b[:12]}")
    if problems:
        raise ServerMismatchError(
            f"{a.name} server at {a.url} and {b.name} server at {b.url} use different "
            f"tokenizers ({'; '.join(problems)}). Dual sampling needs one shared vocabulary: "
            f"serve two models with the same tokenizer.")



def _is_missing_route(exc: ServerError) -> bool:
    """A 404 from `_once` (its message names the status): the server lacks the route."""
    return "with HTTP 404:" in str(exc)
