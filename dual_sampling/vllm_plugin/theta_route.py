"""`POST /v1/dual_sampling/load_theta`: a new policy into a running server, no restart.

Request `{"path": "<checkpoint dir on the server's machine>"}`; reply
`{"theta_version": N, "theta_path": path, "load_s": seconds}`. Served by every server
start_vllm.sh starts except a `--target` one (409: the target stays put): on a fused server
it replaces the `theta` submodule's weights only, on a `--theta`/`--model` server the model's.

The swap, one at a time (a lock):
1. the checkpoint is checked (theta_checkpoint.py: config, tensor names and shapes,
   tokenizer); a misfit answers 422 naming what differs, and nothing changes;
2. requests arriving from now on are held at the door (`ThetaGate`, below) until the swap
   ends, and the swap waits until every request already past the door has been answered:
   requests in flight FINISH ON THE OLD WEIGHTS, and each request runs on one version;
3. `pause_generation(mode="wait")` (vLLM's own drain: nothing new is scheduled, what runs
   finishes) clears the prefix cache;
4. every worker reloads theta in place (theta_worker.py), the prefix cache is reset again,
   the version goes up by one, the engine resumes and the door opens.
A load that fails half-way (a corrupt file) reloads the previous checkpoint and answers
500; the version is unchanged.

Versions: a fresh server is `theta_version` 0 on the checkpoint it started with. Every HTTP
reply carries `x-dual-sampling-theta-version`, the version it ran on. A client that pins a
version (`x-dual-sampling-pin-theta-version: N`, as sample and score runs do) is refused
with 409 ThetaChanged once the server moved on, instead of getting tokens from another
policy under the old label; the session route checks the same pin at each OPEN.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel

from dual_sampling.vllm_plugin import theta_checkpoint
from dual_sampling.vllm_plugin.replies import error
from dual_sampling.wire.theta_format import (CHANGED, CHANGED_PREFIX, PATH, PIN_HEADER,
                                        VERSION_HEADER)

UNGATED = frozenset({"/health", "/ping", "/metrics", "/version", "/v1/models", PATH,
                     "/v1/dual_sampling/info"})

router = APIRouter()
log = logging.getLogger("vllm.dual_sampling.theta")


@dataclass
class ThetaState:
    """The API process's view of the served theta (one per server)."""

    path: str  # the checkpoint now served
    served_path: str  # the one the engine was built from: shapes are checked against it
    role: str
    version: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: asyncio.Event = field(default_factory=asyncio.Event)  # the door: clear in a swap
    active: int = 0  # HTTP requests past the door, not yet answered
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set when active == 0

    def __post_init__(self) -> None:
        self.open.set()
        self.drained.set()

    def enter(self) -> None:
        self.active += 1
        self.drained.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.drained.set()

    def changed(self, pinned: Optional[str], swapping_counts: bool = False) -> Optional[str]:
        """The refusal for a request pinned to another version (with `swapping_counts`: or
        pinned while a swap runs), or None."""
        if pinned is None:
            return None
        if swapping_counts and not self.open.is_set():
            return (f"{CHANGED_PREFIX}: load_theta is replacing theta_version {self.version} "
                    f"on this server; the request was pinned to version {pinned}. Start the "
                    f"run again (it resumes) once the swap is done")
        if pinned == str(self.version):
            return None
        return (f"{CHANGED_PREFIX}: this server now serves theta_version {self.version} "
                f"({self.path}); the request was pinned to version {pinned}. Records of "
                f"the old version are complete; start the run again (it resumes) to sample "
                f"the rest from the new theta")


def init_state(app_state: Any, model_config: Any, served_name: str) -> None:
    app_state.dual_sampling_theta = ThetaState(
        path=model_config.model, served_path=model_config.model, role=served_name)


def state_of(app: Any) -> Optional[ThetaState]:
    return getattr(getattr(app, "state", None), "dual_sampling_theta", None)


class ThetaGate:
    """ASGI middleware: holds HTTP requests during a swap, refuses stale pins, stamps replies."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        state = state_of(scope.get("app")) if scope["type"] == "http" else None
        if state is None:
            return await self.app(scope, receive, send)
        gated = scope["path"] not in UNGATED  # facts and health answer during a swap
        if gated:
            await state.open.wait()
        version = str(state.version)
        pinned = next((v.decode() for k, v in scope["headers"] if k == PIN_HEADER.encode()),
                      None)
        refusal = state.changed(pinned) if gated else None
        if refusal is not None:
            response = error(409, refusal, kind=CHANGED)
            response.headers[VERSION_HEADER] = version
            return await response(scope, receive, send)

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()),
                                      (VERSION_HEADER.encode(), version.encode())]
            await send(message)

        if not gated:
            return await self.app(scope, receive, stamped)
        state.enter()
        try:
            await self.app(scope, receive, stamped)
        finally:
            state.leave()


class LoadTheta(BaseModel):
    path: str


@router.post(PATH)
async def load_theta(body: LoadTheta, request: Request) -> Any:
    state = state_of(request.app)
    engine = request.app.state.engine_client
    if state is None:
        return error(503, "the server is still starting: try again")
    if state.role == "target":
        return error(409, "this is the target server: load_theta replaces the policy, which "
                          "is served by the theta (or fused) server; the target stays put")
    async with state.lock:
        problems = await asyncio.to_thread(
            theta_checkpoint.problems, body.path, state.served_path, engine.get_tokenizer())
        if problems:
            return error(422, f"load_theta refused {body.path}; the server keeps serving "
                              f"theta_version {state.version} ({state.path}): "
                              + "; ".join(problems))
        start = time.perf_counter()
        state.open.clear()
        try:
            # every request past the door finishes on the old weights, up to its reply (one
            # that had not reached the engine yet would otherwise be queued by the pause and
            # run on the new weights under the old version)
            await state.drained.wait()
            await engine.pause_generation(mode="wait", clear_cache=True)
            try:
                await _reload(engine, body.path, state)
            finally:
                await engine.resume_generation()
        except Exception as exc:
            log.exception("load_theta %s failed", body.path)
            return error(500, f"load_theta {body.path} failed ({type(exc).__name__}: {exc}); "
                              f"{state.path} was loaded back: the server serves "
                              f"theta_version {state.version}")
        finally:
            state.open.set()
    load_s = time.perf_counter() - start
    log.info("theta_version %d: %s (%.2f s)", state.version, state.path, load_s)
    return {"theta_version": state.version, "theta_path": state.path, "load_s": load_s}


async def _reload(engine: Any, path: str, state: ThetaState) -> None:
    """Load `path` on every worker; on failure load the previous checkpoint back, re-raise."""
    try:
        await engine.collective_rpc("dual_sampling_load_theta", args=(path,))
    except Exception:
        await engine.collective_rpc("dual_sampling_load_theta", args=(state.path,))
        await engine.reset_prefix_cache()
        raise
    await engine.reset_prefix_cache()
    state.version += 1
    state.path = path
