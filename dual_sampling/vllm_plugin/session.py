"""`/v1/dual_sampling/session` (WebSocket): resident per-token sessions for dual sampling.

Why a WebSocket: the exchange is a long conversation, one small message each way per step,
over one connection per coordinator. A WebSocket gives message framing, binary frames and,
above all, a close that the server sees at once (a clean close, a killed client's TCP
reset, or uvicorn's ping timeout for a silent peer), which is what lets the server free a
connection's sessions the moment its coordinator is gone. vLLM's server already serves
WebSockets (its realtime route) through uvicorn and the `websockets` package, and aiohttp has
the client. The streaming-HTTP alternative, a request body and a response body both held open
for the whole run, needs full-duplex HTTP/1.1 that aiohttp's client and most proxies do not
do, and would need its own message framing.

Each session is one resident engine request: `engine_client.generate()` fed an async
generator of `StreamingInput` chunks, with `max_tokens=1, logprobs=k, temperature=0,
output_kind=DELTA, detokenize=False, flat_logprobs=True`. A chunk (the prompt at OPEN, the
chosen token(s) at each STEP) extends the request's prompt; the engine keeps its KV cache,
computes only the new tokens, answers one output whose logprobs are the top-k after them, and
discards the token it sampled before the next chunk (`_update_request_as_session` in vLLM's
scheduler). Log-probs are the engine's sample logprobs, so the server's `--logprobs-mode`
(raw_logprobs by default) applies exactly as on `/v1/completions`. The flat logprobs hold
k + 1 entries per position: the sampled token first, then the top k by decreasing logprob.

Messages (dual_sampling/wire/session_format.py): OPEN and STEP change state when they are read,
in order, and their replies follow as soon as every listed session has its output, so an
OPEN and a STEP sent back to back run in the same engine steps. A bad message gets an error
frame naming the session and the limit, and changes nothing.

Cleanup: when the socket closes for any reason, or on CLOSE/ABORT, each session first gets
up to `DRAIN_S` for an output already in flight (so no chunk is still on its way to the
engine), then its generate() is cancelled (vLLM aborts the request and frees its KV blocks)
and `engine_client.abort()` is called on the connection's request ids as a safety net.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect
from vllm.engine.protocol import StreamingInput
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind, SamplingParams

from dual_sampling.vllm_plugin import compat, patches
from dual_sampling.vllm_plugin.full_logits import FULL_KEY, keeps_full_logits
from dual_sampling.vllm_plugin.theta_route import state_of
from dual_sampling.wire import session_format as wire
from dual_sampling.wire.theta_format import PIN_HEADER

router = APIRouter()

DRAIN_S = 5.0
GATE_S = 0.05  # longest a STEP's engine messages wait for a chunk that never comes


class _SendGate:
    """Send the engine-core messages of one OPEN or STEP back to back, as one batch.

    vLLM's server turns each session's chunk into its own engine-core ADD message (input
    validation, then a ZMQ send), one session at a time on the event loop. The engine core,
    in its own process, starts a step with whatever has arrived, so a 32-session STEP ran as
    about two engine steps of half the batch each (132 engine steps for 70 coordinator
    steps). The gate wraps the engine client's `add_request_async` (once per server): the
    messages of one OPEN or STEP are held until all are ready (or `GATE_S` has passed), then
    sent back to back; any other request passes straight through. The engine core's input
    gap (tuning.py) then takes them as one step. Measured at 32 sessions, 40 tokens: gap and
    gate 40 to 44 engine steps, gap alone 59 to 61; gate alone, about 2 per token as stock.
    """

    def __init__(self, engine: Any) -> None:
        self.core = engine.engine_core
        self.batches: dict[str, dict] = {}  # external request id -> its batch

        def make(original: Any) -> Any:
            self.send = original

            async def add_request_async(request: Any) -> None:
                return await self._add(request)
            return add_request_async
        patches.replace(self.core, "add_request_async", make, feature="session_gate",
                        setting=id(self))

    @classmethod
    def of(cls, state: Any, engine: Any) -> "_SendGate | _NoGate":
        if not compat.usable("session_gate"):
            return _NoGate()
        gate = getattr(state, "dual_sampling_gate", None)
        if gate is None or gate.core is not engine.engine_core:
            gate = state.dual_sampling_gate = cls(engine)
        return gate

    def expect(self, request_ids: list[str]) -> None:
        batch: dict = {"waiting": set(request_ids), "held": []}
        for request_id in request_ids:
            self.batches[request_id] = batch
        asyncio.get_running_loop().call_later(
            GATE_S, lambda: asyncio.ensure_future(self._flush(batch)))

    async def _add(self, request: Any) -> None:
        request_id = getattr(request, "external_req_id", None) or ""
        batch = self.batches.pop(request_id, None)
        if batch is None:
            return await self.send(request)
        batch["held"].append(request)
        batch["waiting"].discard(request_id)
        if not batch["waiting"]:
            await self._flush(batch)

    async def _flush(self, batch: dict) -> None:
        for request_id in batch["waiting"]:  # late ones, if any, go straight through
            self.batches.pop(request_id, None)
        batch["waiting"] = set()
        held, batch["held"] = batch["held"], []
        for request in held:
            await self.send(request)


class _NoGate:
    """Where this vLLM lacks what the gate wraps: messages go as they come (stock)."""

    def expect(self, request_ids: list[str]) -> None:
        return None


class SessionRefused(Exception):
    """A message this route refuses with an error frame; nothing was changed."""


@dataclass
class _Step:
    """The reply being assembled for one OPEN or STEP message."""

    op: int
    msg_id: int
    ids: np.ndarray  # (n, k) int32
    logp: np.ndarray  # (n, k) float32
    remaining: int
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    wanted: dict[str, int] = field(default_factory=dict)  # FULL: request id -> position

    def fill(self, row: int, token_ids: list[int], logprobs: list[float]) -> None:
        k = self.ids.shape[1]
        if len(token_ids) != k:
            self.fail(f"the engine returned {len(token_ids)} logprobs for row {row}, not k={k}")
            return
        self.ids[row], self.logp[row] = token_ids, logprobs
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)

    def fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(SessionRefused(message))


class _Session:
    """One resident engine request; at most one chunk in flight."""

    def __init__(self, engine: Any, sid: int, request_id: str, k: int,
                 params: SamplingParams) -> None:
        self.sid, self.request_id, self.k = sid, request_id, k
        self.full = k == wire.FULL  # its steps give whole rows (vllm_plugin/full_logits.py)
        self.length = 0  # tokens the engine holds for it
        self.pending: Optional[tuple[_Step, int]] = None
        self.ended: Optional[str] = None  # why the engine request is gone, once it is
        self.idle = asyncio.Event()
        self.idle.set()
        self._inputs: asyncio.Queue[StreamingInput] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(engine, params))

    def send(self, tokens: list[int], step: _Step, row: int,
             params: Optional[SamplingParams]) -> None:
        self.pending = (step, row)
        self.idle.clear()
        self.length += len(tokens)
        self._inputs.put_nowait(StreamingInput(prompt=tokens_input(tokens),
                                               sampling_params=params))

    async def _chunks(self) -> AsyncIterator[StreamingInput]:
        while True:
            yield await self._inputs.get()

    async def _pump(self, engine: Any, params: SamplingParams) -> None:
        try:
            async with contextlib.aclosing(engine.generate(
                    self._chunks(), params, request_id=self.request_id)) as outputs:
                async for output in outputs:
                    if self.pending is None:
                        continue
                    step, row = self.pending
                    self.pending = None
                    self.idle.set()
                    if output.finished:
                        self.ended = "the engine ended the request (aborted or out of resources)"
                        step.fail(f"session {self.sid}: {self.ended}")
                        return
                    if self.full:  # the row waits in the worker (full_logits.py)
                        step.fill(row, [], [])
                        continue
                    flat = output.outputs[0].logprobs
                    start, end = flat.start_indices[-1] + 1, flat.end_indices[-1]
                    step.fill(row, flat.token_ids[start:end], flat.logprobs[start:end])
            self.ended = "the engine request finished"
        except Exception as exc:  # the engine refused a chunk; the client sees why
            self.ended = f"{type(exc).__name__}: {exc}"
        finally:
            self.idle.set()
            if self.pending is not None:
                self.pending[0].fail(f"session {self.sid}: {self.ended or 'closed'}")
                self.pending = None

    async def close(self) -> None:
        """Let an output in flight land (bounded), then cancel: vLLM aborts the request."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), DRAIN_S)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _Connection:
    """The sessions of one WebSocket."""

    def __init__(self, websocket: WebSocket) -> None:
        self.ws = websocket
        self.engine = websocket.app.state.engine_client
        self.gate = _SendGate.of(websocket.app.state, self.engine)
        model_config = self.engine.model_config
        self.vocab_size = model_config.get_vocab_size()
        self.max_model_len = model_config.max_model_len
        self.max_logprobs = (self.vocab_size if model_config.max_logprobs == -1
                             else model_config.max_logprobs)
        self.max_sessions = self.engine.vllm_config.scheduler_config.max_num_seqs
        self.full_ok = keeps_full_logits(model_config)
        self.prefix = f"dsess-{uuid.uuid4().hex[:12]}"
        self.opened = itertools.count()  # request ids stay unique if a client reuses a sid
        self.sessions: dict[int, _Session] = {}
        self.tasks: set[asyncio.Task] = set()
        self.send_lock = asyncio.Lock()
        self._params: dict[int, SamplingParams] = {}
        self.theta = state_of(websocket.app)  # load_theta's version (theta_route.py)
        self.pinned = websocket.headers.get(PIN_HEADER)

    # -- server-wide count: paused sessions hold engine slots (max_num_seqs) -------------
    def _server_sessions(self, change: int = 0) -> int:
        state = self.ws.app.state
        state.dual_sampling_sessions = getattr(state, "dual_sampling_sessions", 0) + change
        return state.dual_sampling_sessions

    def params(self, k: int) -> SamplingParams:
        if k not in self._params:
            self._params[k] = SamplingParams(
                max_tokens=1, temperature=0.0, logprobs=k, detokenize=False,
                flat_logprobs=True, output_kind=RequestOutputKind.DELTA)
        return self._params[k]

    async def serve(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("bytes")
            if frame is None:
                await self._send_error(-1, "text frames are not part of this protocol: send "
                                           "binary frames (dual_sampling/wire/session_format.py)")
                continue
            msg_id = -1
            try:
                op, msg_id = wire.request_header(frame)
                if op in (wire.OPEN, wire.STEP):
                    self._spawn(self._reply(self._submit(wire.decode_chunks(frame))))
                else:
                    sids = list(self.sessions) if op == wire.ABORT else wire.decode_close(frame)
                    self._spawn(self._ack(op, msg_id, self._detach(sids)))
            except (SessionRefused, wire.SessionFormatError) as exc:
                await self._send_error(msg_id, str(exc))

    # -- OPEN / STEP -----------------------------------------------------------------------
    def _check(self, msg: wire.Chunks) -> None:
        name = wire.OP_NAMES[msg.op]
        if self.theta is not None and self.pinned is not None:
            # a pinned connection never mixes versions: refused while a swap runs (idle
            # sessions do not hold vLLM's pause) and after it (theta_route.py)
            refusal = self.theta.changed(self.pinned, swapping_counts=True)
            if refusal is not None:
                raise SessionRefused(f"{name}: {refusal}")
        if msg.k == wire.FULL and not self.full_ok:
            raise SessionRefused(f"{name}: k=0 (the whole distribution) needs this package's "
                                 f"logits processor: restart the server with start_vllm.sh, "
                                 f"or give sample.top_k for the top-k transport.")
        if msg.k != wire.FULL and not 1 <= msg.k <= self.max_logprobs:
            raise SessionRefused(f"{name}: k={msg.k} is outside [1, {self.max_logprobs}]: "
                                 f"restart the server with a larger --max-logprobs or ask "
                                 f"for fewer.")
        if len(set(msg.sids.tolist())) != len(msg.sids):
            raise SessionRefused(f"{name}: a session id appears twice in one message")
        if msg.tokens.size and (msg.tokens.min() < 0 or msg.tokens.max() >= self.vocab_size):
            bad = msg.tokens[(msg.tokens < 0) | (msg.tokens >= self.vocab_size)][0]
            raise SessionRefused(f"{name}: token id {bad} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        limit = self.max_model_len - 1  # one slot stays for the generated token
        for sid, length in zip(msg.sids.tolist(), msg.lengths.tolist()):
            if msg.op == wire.OPEN:
                if sid in self.sessions:
                    raise SessionRefused(f"OPEN: session {sid} is already open on this "
                                         f"connection")
                held = 0
            else:
                session = self.sessions.get(sid)
                if session is None:
                    raise SessionRefused(f"STEP: session {sid} is not open on this connection "
                                         f"(OPEN it with its whole context first)")
                if session.ended:
                    raise SessionRefused(f"STEP: session {sid} has ended ({session.ended}); "
                                         f"CLOSE it and OPEN it again with its context")
                if session.full != (msg.k == wire.FULL):
                    raise SessionRefused(f"STEP: session {sid} was opened with k="
                                         f"{session.k}; a session keeps whole rows (k=0) or "
                                         f"a top-k for its life")
                if session.pending is not None:
                    raise SessionRefused(f"STEP: session {sid} still has a step in flight; "
                                         f"wait for its reply")
                held = session.length
            if held + length > limit:
                raise SessionRefused(
                    f"{name}: session {sid} would hold {held + length} tokens; with "
                    f"--max-model-len={self.max_model_len} a session holds at most {limit}")
        if msg.op == wire.OPEN and self._server_sessions() + len(msg.sids) > self.max_sessions:
            raise SessionRefused(
                f"OPEN: {len(msg.sids)} more sessions would exceed this server's "
                f"--max-num-seqs={self.max_sessions} ({self._server_sessions()} open): open "
                f"sessions hold engine slots; lower the coordinator's concurrency or restart "
                f"the server with a larger --max-num-seqs")

    def _submit(self, msg: wire.Chunks) -> _Step:
        self._check(msg)
        n = len(msg.sids)
        step = _Step(msg.op, msg.msg_id, np.empty((n, msg.k), dtype=wire.WORD),
                     np.empty((n, msg.k), dtype=wire.LOGP), remaining=n)
        params = None if msg.k == wire.FULL else self.params(msg.k)
        if msg.op == wire.OPEN:
            self._server_sessions(n)
            ids = [f"{self.prefix}-{sid}-{next(self.opened)}" for sid in msg.sids.tolist()]
        else:
            ids = [self.sessions[sid].request_id for sid in msg.sids.tolist()]
        self.gate.expect(ids)
        for row, (sid, tokens) in enumerate(zip(msg.sids.tolist(), msg.per_session())):
            if msg.op == wire.OPEN:
                session = _Session(self.engine, sid, ids[row], msg.k,
                                   params or _full_params(ids[row]))
                self.sessions[sid] = session
                session.send(tokens, step, row, None)
            else:
                session = self.sessions[sid]
                session.send(tokens, step, row, None if msg.k == session.k else params)
                session.k = msg.k
            if msg.k == wire.FULL:  # its row: the logits after all the tokens it holds
                step.wanted[ids[row]] = self.sessions[sid].length
        return step

    async def _reply(self, step: _Step) -> None:
        try:
            await step.done
        except SessionRefused as exc:
            await self._send_error(step.msg_id, f"{wire.OP_NAMES[step.op]}: {exc}")
            return
        if not step.wanted:
            await self._send(wire.encode_topk(step.op, step.msg_id, step.ids, step.logp))
            return
        try:
            rows = (await self.engine.collective_rpc("dual_sampling_pop_full",
                                                     args=(step.wanted,)))[0]
        except Exception as exc:  # noqa: BLE001 - the client must hear of it, not time out
            await self._send_error(step.msg_id, f"{wire.OP_NAMES[step.op]}: the engine could "
                                                f"not hand over the logits: {exc}")
            return
        if rows["missing"]:
            await self._send_error(step.msg_id, (
                f"{wire.OP_NAMES[step.op]}: the engine kept no logits for {rows['missing'][:4]}"
                f" (positions {[step.wanted[t] for t in rows['missing'][:4]]}): this "
                f"server's vLLM does not run vllm_plugin/full_logits.py as this package "
                f"expects; use sample.top_k"))
            return
        await self._send(wire.encode_full(step.op, step.msg_id, rows["rows"], rows["n"],
                                          rows["width"], rows["dtype"]))

    # -- CLOSE / ABORT / disconnect ------------------------------------------------------------
    def _detach(self, sids: list[int]) -> list[_Session]:
        """Take sessions off the connection now (later messages no longer see them)."""
        detached = [self.sessions.pop(sid) for sid in sids if sid in self.sessions]
        self._server_sessions(-len(detached))
        return detached

    async def _end(self, sessions: list[_Session]) -> None:
        if not sessions:
            return
        await asyncio.gather(*(session.close() for session in sessions))
        await self.engine.abort([session.request_id for session in sessions])

    async def _ack(self, op: int, msg_id: int, sessions: list[_Session]) -> None:
        await self._end(sessions)
        await self._send(wire.encode_ack(op, msg_id, len(sessions)))

    async def close_all(self) -> None:
        """End every session, then let the message tasks finish: a CLOSE still ending its
        sessions must not be cut short, and replies to a closed socket are dropped."""
        await self._end(self._detach(list(self.sessions)))
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- sending -------------------------------------------------------------------------------
    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, frame: bytes) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the peer is gone
            async with self.send_lock:
                await self.ws.send_bytes(frame)

    async def _send_error(self, msg_id: int, message: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            async with self.send_lock:
                await self.ws.send_text(wire.encode_error(msg_id, message))


def _full_params(request_id: str) -> SamplingParams:
    """A FULL session's engine request: its logits are kept under its request id."""
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                          output_kind=RequestOutputKind.DELTA,
                          extra_args={FULL_KEY: request_id})


@router.websocket(wire.PATH)
async def session_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    connection = _Connection(websocket)
    try:
        await connection.serve()
    except WebSocketDisconnect:
        pass
    finally:
        await asyncio.shield(connection.close_all())
