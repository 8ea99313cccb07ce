"""HTTP to one server: a pooled aiohttp session, the retry policy, errors that name the server.

Retry policy (anchored on the OpenAI Python client's): connection errors, timeouts, 408,
429 and 5xx are retried `max_retries` times (2 by default) with exponential backoff from
0.5 s doubling to at most 8 s, plus up to 25% jitter; any other 4xx and any malformed 2xx
body fail at once. Every error that reaches the caller is a `ServerError` naming the
server, the request and what to do; 401/403 (a server started with an API key that did not
get it) is `AuthenticationError`. `dual_sampling.clients.client.VLLMClient` builds on it.

API key: `api_key` goes out as `Authorization: Bearer ...` on every request (vLLM's
`--api-key`/`VLLM_API_KEY` guards every `/v1` route); it is never logged nor put in a message.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

import aiohttp
from tenacity import (AsyncRetrying, RetryError, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from dual_sampling.errors import (AuthenticationError, MalformedResponseError, ServerError,
                                  ThetaChangedError)
from dual_sampling.wire.theta_format import CHANGED as THETA_CHANGED

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
AUTH_STATUSES = frozenset({401, 403})


class _RetryableError(Exception):
    """A transient failure the retry policy retries; wraps the cause for the final message."""


class HttpClient:
    """Async HTTP to one server. Use as `async with Client(url, name=...) as c:`.

    api_key: sent as `Authorization: Bearer ...` (None: no key). api_key_hint: how a user
    gives this client its key, for the message of an `AuthenticationError`."""

    def __init__(self, url: str, *, name: str = "server", model: Optional[str] = None,
                 timeout_s: float = 120.0, max_retries: int = 2, max_connections: int = 64,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 8.0,
                 api_key: Optional[str] = None,
                 api_key_hint: str = "pass the server's key as `api_key=`") -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._max_connections = max_connections
        self._session: Optional[aiohttp.ClientSession] = None
        self.headers: dict[str, str] = {}  # sent with every request (a pinned theta version)
        # kept apart from `headers`, which other code reads and may show
        self.auth_headers: dict[str, str] = (
            {"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.api_key_hint = api_key_hint

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> "HttpClient":
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=3.0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=self.auth_headers)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _where(self, method: str, path: str) -> str:
        return f"{self.name} server at {self.url} ({method} {path})"

    def refused_key(self, where: str, status: int) -> AuthenticationError:
        """The error for a 401/403 from the server at `where` (the transports' too)."""
        sent = ("the API key sent was not accepted" if self.auth_headers
                else "no API key was sent and the server requires one")
        return AuthenticationError(
            f"{where} answered HTTP {status}: {sent}. Give this client the server's key: "
            f"{self.api_key_hint}; it is the key the server was started with "
            f"(./start_vllm.sh --api-key KEY, or VLLM_API_KEY in its environment).")

    # -- raw requests with the retry policy ---------------------------------------------
    async def _once(self, method: str, path: str, body: Any, want: str) -> Any:
        assert self._session is not None, "use `async with` on the client"
        try:
            async with self._session.request(method, self.url + path, json=body,
                                             headers=self.headers) as resp:
                payload = await resp.read()
                if resp.status in AUTH_STATUSES:
                    raise self.refused_key(self._where(method, path), resp.status)
                if resp.status in RETRY_STATUSES:
                    raise _RetryableError(f"HTTP {resp.status}: {payload[:300]!r}")
                if resp.status == 409 and THETA_CHANGED.encode() in payload:
                    raise ThetaChangedError(f"{self._where(method, path)}: "
                                            f"{_error_message(payload)}")
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


def _error_message(payload: bytes) -> str:
    """The message of an error body in vLLM's shape, else the body itself."""
    try:
        return str(json.loads(payload)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return payload[:500].decode(errors="replace")


def _field(reply: Any, key: str, where: str) -> Any:
    try:
        return reply[key]
    except (KeyError, TypeError) as exc:
        raise MalformedResponseError(f"{where} answered without `{key}`: {str(reply)[:200]}"
                                     ) from exc


def _is_missing_route(exc: ServerError) -> bool:
    """A 404 from `_once` (its message names the status): the server lacks the route."""
    return "with HTTP 404:" in str(exc)
