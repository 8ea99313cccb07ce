"""The client's retry policy against a fake server doing what a real one cannot on demand:
a 500, a 429, a 400, a hang, a malformed body, a closed port. (The real-server behaviour is
covered in test_sample.py.)"""
from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from dual_sampling.clients.client import VLLMClient
from dual_sampling.errors import AuthenticationError, MalformedResponseError, ServerError


class FakeServer:
    """Answers `/v1/completions` from a script of behaviours, one per request."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        action = self.script.pop(0) if self.script else "ok"
        if action == "ok":
            return web.json_response({"choices": [{"index": 0, "logprobs": {"top_logprobs": [
                {"token_id:5": -0.1, "token_id:7": -2.5}]}}]})
        if action == "hang":
            await asyncio.sleep(2)
        if action == "malformed":
            return web.Response(text="{not json", content_type="application/json")
        return web.Response(status=int(action), text=f"status {action}")


async def _serve(fake: FakeServer) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def _run(script: list[str], max_retries: int = 2, timeout_s: float = 5.0):
    """Send one step to a fake server; return (result or exception, calls made)."""
    fake = FakeServer(script)

    async def go():
        runner, url = await _serve(fake)
        try:
            async with VLLMClient(url, name="theta", model="m", max_retries=max_retries,
                                  timeout_s=timeout_s, backoff_initial_s=0.01,
                                  backoff_max_s=0.05) as client:
                try:
                    return await client.next_token_topk([[1, 2, 3]], 2)
                except ServerError as exc:
                    return exc
        finally:
            await runner.cleanup()

    return asyncio.run(go()), fake.calls


@pytest.mark.parametrize("status", ["500", "503", "429", "408"])
def test_transient_statuses_are_retried_then_succeed(status):
    result, calls = _run([status, status])
    assert calls == 3
    ids, logp = result
    assert ids.tolist() == [[5, 7]] and logp[0, 0] == pytest.approx(-0.1)


def test_persistent_500_fails_after_retries_naming_server_and_request():
    result, calls = _run(["500"] * 5, max_retries=2)
    assert calls == 3
    assert isinstance(result, ServerError)
    assert "theta server at http://127.0.0.1" in str(result)
    assert "/v1/completions" in str(result) and "3 attempt" in str(result)


def test_client_error_is_not_retried():
    result, calls = _run(["400"])
    assert calls == 1
    assert isinstance(result, ServerError) and "HTTP 400" in str(result)


@pytest.mark.parametrize("status", ["401", "403"])
def test_a_refused_api_key_is_not_retried_and_says_what_to_do(status):
    result, calls = _run([status] * 3)
    assert calls == 1 and isinstance(result, AuthenticationError)
    assert "theta server at http://127.0.0.1:" in str(result)
    assert f"HTTP {status}: no API key was sent" in str(result) and "api_key=" in str(result)


def test_hang_times_out_and_is_retried():
    result, calls = _run(["hang", "ok"], timeout_s=0.5)
    assert calls == 2
    assert result[0].tolist() == [[5, 7]]


def test_malformed_body_is_refused_without_retry():
    result, calls = _run(["malformed"])
    assert calls == 1
    assert isinstance(result, MalformedResponseError) and "not JSON" in str(result)


def test_unreachable_server_fails_with_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there

    async def go():
        async with VLLMClient(f"http://127.0.0.1:{port}", name="target", max_retries=1,
                              backoff_initial_s=0.01) as client:
            await client.next_token_topk([[1]], 2)

    with pytest.raises(ServerError, match=r"target server at .* failed after 2 attempt"):
        asyncio.run(go())
