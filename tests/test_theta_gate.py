"""load_theta's door (vllm_plugin/theta_route.ThetaGate) on a stand-in ASGI app.

What a real server cannot show on demand: a request that passed the door just before a swap
began but has not reached the engine yet. The swap must wait until it is answered (else
vLLM's pause would queue it and run it on the new weights under the old version), requests
arriving during the swap must wait at the door, and once the version moved on a request
pinned to the old one must be refused, while unpinned and fact routes pass. The real-server
side of the same contract is tests/test_load_theta.py.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from dual_sampling.vllm_plugin.theta_route import ThetaGate, ThetaState
from dual_sampling.wire.theta_format import PIN_HEADER, VERSION_HEADER


def test_the_swap_waits_for_requests_past_the_door_and_holds_new_ones():
    async def main() -> None:
        state = ThetaState(path="a", served_path="a", role="theta")
        app = SimpleNamespace(state=SimpleNamespace(dual_sampling_theta=state))
        release = asyncio.Event()
        started: list[str] = []

        async def engine_route(scope: dict, receive: object, send) -> None:
            started.append(scope["path"])
            if scope["path"] == "/v1/completions":
                await release.wait()  # the request is slow to reach the engine
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        gate = ThetaGate(engine_route)

        async def call(path: str, pin: str | None = None) -> tuple[int, dict, bytes]:
            messages: list[dict] = []

            async def send(message: dict) -> None:
                messages.append(message)

            headers = [(PIN_HEADER.encode(), pin.encode())] if pin is not None else []
            await gate({"type": "http", "path": path, "app": app, "headers": headers},
                       None, send)
            start, body = messages
            return start["status"], dict(start["headers"]), body["body"]

        first = asyncio.create_task(call("/v1/completions", pin="0"))
        await asyncio.sleep(0.01)
        assert state.active == 1 and not state.drained.is_set()
        state.open.clear()  # load_theta begins: the door closes
        second = asyncio.create_task(call("/v1/completions", pin="0"))
        unpinned = asyncio.create_task(call("/v1/completions"))
        facts = await call("/v1/dual_sampling/info", pin="0")  # facts answer during a swap
        assert facts[0] == 200
        await asyncio.sleep(0.01)
        assert started == ["/v1/completions", "/v1/dual_sampling/info"]  # the rest wait
        assert not state.drained.is_set()  # the swap may not start yet
        release.set()
        status, headers, _ = await first
        assert status == 200 and headers[VERSION_HEADER.encode()] == b"0"  # old weights
        await asyncio.wait_for(state.drained.wait(), 1)
        state.version, state.path = 1, "b"  # the swap is done
        state.open.set()
        status, headers, body = await second
        assert status == 409 and headers[VERSION_HEADER.encode()] == b"1"
        error = json.loads(body)["error"]
        assert error["type"] == "ThetaChanged" and "pinned to version 0" in error["message"]
        status, headers, _ = await unpinned
        assert status == 200 and headers[VERSION_HEADER.encode()] == b"1"
        assert state.active == 0 and state.drained.is_set()

    asyncio.run(main())
