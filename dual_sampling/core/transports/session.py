"""The session transport: each step over one WebSocket per server to resident vLLM sessions.

    infos = [await theta.describe(), await target.describe()]   # theta, target: VLLMClient
    if all(info.serves(wire.PATH) for info in infos):
        transport = SessionTransport(theta, target)
    try:
        ... Coordinator(transport, ...).run(prompts) ...
    finally:
        await transport.aclose()

Implements the coordinator's `Transport` protocol over this package's session route
(dual_sampling/vllm_plugin/session.py; wire format in dual_sampling/wire/session_format.py). A key
the transport has not seen opens a session with its whole context; a seen key sends only the
tokens appended to its context since its last step (contexts only ever grow while a key is
active). Both servers get their messages at once; each server's new keys go in one OPEN
message and its seen keys in one STEP message, sent back to back, so a step costs one round
trip whatever mix of new and old sequences it holds.

Failures: a refusal from the server (bad token, k over --max-logprobs, too many sessions,
context over --max-model-len) raises `ServerError` at once, and a handshake refused with
401/403 `AuthenticationError` (the socket sends the client's API key, as its requests do).
A lost connection or a reply slower than `timeout_s` is retried up to `max_retries` times
(backoff 0.5 s doubling): the transport reconnects and reopens every active key from the
full context the coordinator passes in, so the tokens stay the same. Closing the socket
(aclose, a crash, a killed process) is enough for the server to abort every session of this
connection and free its KV cache.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import warnings
from typing import Any, Optional

import aiohttp
import numpy as np
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from dual_sampling.clients.client import VLLMClient
from dual_sampling.clients.http_client import AUTH_STATUSES
from dual_sampling.errors import (MalformedResponseError, ServerError, ServerMismatchError,
                                  ThetaChangedError)
from dual_sampling.wire import session_format as wire
from dual_sampling.wire.theta_format import CHANGED_PREFIX

log = logging.getLogger(__name__)


class _ConnectionLost(Exception):
    """The socket closed, failed or timed out: retried by reconnecting."""


class _ServerSessions:
    """One server's session connection: which keys it holds, and how many of their tokens."""

    def __init__(self, client: VLLMClient, *, timeout_s: float, max_retries: int,
                 backoff_initial_s: float) -> None:
        self.name, self.url = client.name, client.url
        self.client = client  # its API key, and the error that a refused key raises
        self.ws_url = "ws" + self.url[len("http"):] + wire.PATH
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_initial_s = backoff_initial_s
        self.headers = client.headers  # the client's pinned theta version, if any
        self.sids: dict[int, int] = {}  # key -> session id on this connection
        self.held: dict[int, int] = {}  # key -> tokens of its context the server holds
        self._http: Optional[aiohttp.ClientSession] = None
        self._ws: Optional[aiohttp.ClientWebSocketResponse] = None
        self._reader: Optional[asyncio.Task] = None
        self._replies: dict[int, asyncio.Future] = {}
        self._sid_counter = itertools.count()
        self.bytes_sent = self.bytes_received = 0  # frames of OPEN/STEP and their replies
        self._msg_counter = itertools.count()
        self._lock = asyncio.Lock()

    def _where(self) -> str:
        return f"{self.name} server at {self.url} ({wire.PATH})"

    # -- connection ------------------------------------------------------------------------
    async def _connect(self) -> None:
        if self._ws is not None and not self._ws.closed:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self.client.auth_headers)
        try:
            self._ws = await self._http.ws_connect(self.ws_url, max_msg_size=0, autoping=True,
                                                  headers=self.headers,
                                                  timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in AUTH_STATUSES:
                raise self.client.refused_key(self._where(), exc.status) from exc
            raise ServerError(
                f"{self._where()} refused the session WebSocket (HTTP {exc.status}): the "
                f"server lacks this package's plugin. Start it with ./start_vllm.sh "
                f"(VLLM_PLUGINS=dual_sampling) or use the request transport.") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise _ConnectionLost(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        self._reader = asyncio.create_task(self._read(self._ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Route replies to their waiting calls by msg_id; answers pings while idle."""
        reason = "the server closed the connection"
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    _, msg_id = wire.request_header(message.data)
                    self._resolve(msg_id, message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    msg_id, error = wire.decode_error(message.data)
                    refusal = (ThetaChangedError if error.startswith(CHANGED_PREFIX)
                               else ServerError)(
                        f"{self._where()} refused a message: {error}")
                    for target in ([msg_id] if msg_id >= 0 else list(self._replies)):
                        self._resolve(target, refusal)
                elif message.type == aiohttp.WSMsgType.ERROR:
                    reason = f"connection error: {ws.exception()}"
                    break
        except wire.SessionFormatError as exc:
            reason = f"unreadable frame from the server: {exc}"
        finally:
            if ws.close_code is not None:
                reason += f" (close code {ws.close_code})"
            for msg_id in list(self._replies):
                self._resolve(msg_id, _ConnectionLost(reason))

    def _resolve(self, msg_id: int, outcome: Any) -> None:
        future = self._replies.pop(msg_id, None)
        if future is None or future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    async def _reset(self) -> None:
        """Drop the connection; the server then ends every session it held for us."""
        ws, reader = self._ws, self._reader
        self._ws, self._reader = None, None
        self.sids.clear()
        self.held.clear()
        if ws is not None:
            await ws.close()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    # -- one message -------------------------------------------------------------------------
    def _message(self) -> tuple[int, asyncio.Future]:
        msg_id = next(self._msg_counter) % 2**31
        future = asyncio.get_running_loop().create_future()
        self._replies[msg_id] = future
        return msg_id, future

    async def _call(self, frame: bytes, msg_id: int, future: asyncio.Future) -> bytes:
        try:
            await self._ws.send_bytes(frame)
            self.bytes_sent += len(frame)
            reply = await asyncio.wait_for(future, self.timeout_s)
            self.bytes_received += len(reply)
            return reply
        except asyncio.TimeoutError as exc:
            raise _ConnectionLost(f"no reply within timeout_s={self.timeout_s} s") from exc
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise _ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._replies.pop(msg_id, None)

    async def _with_retries(self, attempt: Any, what: str) -> Any:
        """`attempt()` on a live connection; a lost one is dropped and retried (backoff
        `backoff_initial_s` doubling), up to `max_retries` times, then `ServerError`."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=self.backoff_initial_s, exp_base=2),
            retry=retry_if_exception_type(_ConnectionLost), reraise=True,
            before_sleep=lambda rs: log.warning(
                "%s: %s failed (%s); reconnecting and reopening the sessions in %.1f s",
                self._where(), what, rs.outcome.exception(), rs.next_action.sleep))
        try:
            async for attempt_state in retrying:
                with attempt_state:
                    try:
                        async with self._lock:
                            await self._connect()
                            return await attempt()
                    except _ConnectionLost:
                        await self._reset()
                        raise
        except _ConnectionLost as exc:
            raise ServerError(
                f"{self._where()}: {what} failed after {self.max_retries + 1} attempt(s): "
                f"{exc}. Check that the server is up (`./start_vllm.sh` prints its URL and "
                f"log) and not overloaded; raise `timeout_s`/`max_retries` for slow "
                f"servers.") from exc
        raise AssertionError("unreachable")

    # -- the transport's operations ------------------------------------------------------------
    async def step(self, keys: list[int], contexts: list[list[int]], k: int) -> Any:
        """Top-k ids `(B, k) int64` and logprobs `(B, k) float64` after each context; for
        k = 0 (wire.FULL) the logits `(B, V)` torch tensor, in the dtype the server sent."""
        return await self._with_retries(lambda: self._step_once(keys, contexts, k), "a step")

    async def _step_once(self, keys: list[int], contexts: list[list[int]], k: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        rows = {wire.OPEN: [], wire.STEP: []}
        for row, key in enumerate(keys):
            rows[wire.STEP if key in self.held else wire.OPEN].append(row)
        for key in (keys[row] for row in rows[wire.OPEN]):
            self.sids[key] = next(self._sid_counter) % 2**31
        calls = []
        for op, op_rows in rows.items():
            if not op_rows:
                continue
            chunks = [contexts[row][self.held.get(keys[row], 0):] for row in op_rows]
            if not all(chunks):
                empty = next(keys[row] for row, chunk in zip(op_rows, chunks) if not chunk)
                raise ValueError(f"key {empty} has no new token since its last step")
            msg_id, future = self._message()
            frame = wire.encode_chunks(op, msg_id, k, [self.sids[keys[r]] for r in op_rows],
                                       chunks)
            calls.append((op, op_rows, self._call(frame, msg_id, future)))
        replies = await asyncio.gather(*(call for _, _, call in calls), return_exceptions=True)
        parts = self._settle(keys, contexts, calls, replies)  # [(rows, reply), ...]
        if k == wire.FULL:
            return self._stack_full(len(keys), parts)
        ids = np.empty((len(keys), k), dtype=np.int64)  # (B, k)
        logp = np.empty((len(keys), k), dtype=np.float64)  # (B, k)
        for op_rows, reply in parts:
            ids[op_rows], logp[op_rows] = self._read_topk(reply, len(op_rows), k)
        order = np.argsort(-logp, axis=1, kind="stable")  # (B, k)
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(logp, order, axis=1)

    def _settle(self, keys: list[int], contexts: list[list[int]], calls: list,
                replies: list) -> list[tuple[list[int], bytes]]:
        """Book the step's replies: each answered message's keys are held to their whole
        context, a failed OPEN's keys are forgotten; then raise the failure, if any (a
        refusal would come back after a reconnect too: it wins over a lost link), else
        return (rows, reply) per message."""
        parts, failure = [], None
        for (op, op_rows, _), reply in zip(calls, replies):
            if isinstance(reply, BaseException):
                failure = reply if failure is None or isinstance(reply, ServerError) else failure
                if op == wire.OPEN:
                    for row in op_rows:
                        self.sids.pop(keys[row], None)
                continue
            parts.append((op_rows, reply))
            for row in op_rows:
                self.held[keys[row]] = len(contexts[row])
        if failure is not None:
            raise failure
        return parts

    def _stack_full(self, n_keys: int, parts: list[tuple[list[int], bytes]]) -> Any:
        """The FULL replies of one step as one (B, V) torch tensor, rows in key order."""
        import torch  # the exact path only: the top-k transports need no torch
        rows = [(op_rows, self._read_full(reply, len(op_rows))) for op_rows, reply in parts]
        if len(rows) == 1:
            return rows[0][1]
        widths = {values.shape[1] for _, values in rows}
        if len(widths) != 1:
            raise MalformedResponseError(f"{self._where()} sent rows of {sorted(widths)} ids "
                                         f"in one step")
        out = torch.empty((n_keys, widths.pop()), dtype=rows[0][1].dtype)
        for op_rows, values in rows:
            out[op_rows] = values
        return out

    def _read_full(self, reply: bytes, n: int) -> Any:
        import torch
        try:
            _, _, payload, rows, width, dtype = wire.decode_full(reply)
        except wire.SessionFormatError as exc:
            raise MalformedResponseError(f"{self._where()} sent an unreadable reply: {exc}"
                                         ) from exc
        if rows != n:
            raise MalformedResponseError(f"{self._where()} answered {rows} rows for {n} "
                                         f"sessions")
        with warnings.catch_warnings():  # read-only: the kernels never write to the rows
            warnings.simplefilter("ignore", UserWarning)
            values = torch.frombuffer(payload, dtype=getattr(torch, dtype))
        return values.view(n, width)

    def _read_topk(self, reply: bytes, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            _, _, ids, logp = wire.decode_topk(reply)  # (n, k) each
        except wire.SessionFormatError as exc:
            raise MalformedResponseError(f"{self._where()} sent an unreadable reply: {exc}"
                                         ) from exc
        if ids.shape != (n, k):
            raise MalformedResponseError(f"{self._where()} answered {ids.shape[0]} x "
                                         f"{ids.shape[1]} top-k for {n} sessions, k={k}")
        return ids, logp

    async def release(self, keys: list[int]) -> None:
        """Close these keys' sessions. On a lost connection there is nothing left to close."""
        sids = [self.sids.pop(key) for key in keys if key in self.sids]
        for key in keys:
            self.held.pop(key, None)
        if not sids or self._ws is None or self._ws.closed:
            return
        try:
            async with self._lock:
                msg_id, future = self._message()
                await self._call(wire.encode_close(wire.CLOSE, msg_id, sids), msg_id, future)
        except _ConnectionLost:
            await self._reset()

    async def aclose(self) -> None:
        await self._reset()
        if self._http is not None:
            await self._http.close()
            self._http = None


class SessionTransport:
    """Resident sessions on both servers (`Transport` of dual_sampling.core.coordinator).

    `theta` and `target` give each server's URL, name and API key (VLLMClient objects; `url`,
    `name`, `headers` and `auth_headers` are read). Use `async with SessionTransport(...)` or
    call `aclose()`.
    """

    def __init__(self, theta: VLLMClient, target: VLLMClient, *, timeout_s: float = 120.0,
                 max_retries: int = 2, backoff_initial_s: float = 0.5) -> None:
        options = dict(timeout_s=timeout_s, max_retries=max_retries,
                       backoff_initial_s=backoff_initial_s)
        self.theta = _ServerSessions(theta, **options)
        self.target = _ServerSessions(target, **options)

    async def __aenter__(self) -> "SessionTransport":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def step(self, keys: list[int], contexts: list[list[int]], k: int,
                   target_contexts: Optional[list[list[int]]] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`target_contexts`: the target's own (its prompt, the shared completion); None:
        the same as theta's."""
        (ids_theta, logp_theta), (ids_target, logp_target) = await asyncio.gather(
            self.theta.step(keys, contexts, k),
            self.target.step(keys, target_contexts or contexts, k))
        return ids_theta, logp_theta, ids_target, logp_target

    async def full_step(self, keys: list[int], contexts: list[list[int]],
                        target_contexts: Optional[list[list[int]]] = None
                        ) -> tuple[Any, Any]:
        """Each model's logits over the whole vocabulary after each context, (B, V) torch
        tensors (the exact transport: the coordinator samples q* from them with the fused
        engine's kernels). ServerMismatchError when the two widths differ."""
        theta, target = await asyncio.gather(
            self.theta.step(keys, contexts, wire.FULL),
            self.target.step(keys, target_contexts or contexts, wire.FULL))
        if theta.shape[1] != target.shape[1]:
            raise ServerMismatchError(
                f"the theta server at {self.theta.url} sends {theta.shape[1]} ids a row and "
                f"the target server at {self.target.url} {target.shape[1]}: the two "
                f"tokenizers differ; serve two models with one tokenizer.")
        return theta, target

    async def release(self, keys: list[int]) -> None:
        await asyncio.gather(self.theta.release(keys), self.target.release(keys))

    async def aclose(self) -> None:
        await asyncio.gather(self.theta.aclose(), self.target.aclose())
