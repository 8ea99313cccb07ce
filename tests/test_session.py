"""The session transport against real vLLM CPU servers (the session `servers` pair).

The two transports must give the same tokens for the same seed, and sessions must never
outlive their client: after a finished run, a socket closed mid-step and a client process
killed mid-run, each server's /metrics reads zero running and zero waiting requests.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import aiohttp
import numpy as np
import pytest

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.transports.request import RequestTransport
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.errors import ServerError
from dual_sampling.serving.launch import server_metrics
from dual_sampling.wire import session_format as wire
from helpers import PROMPT_LENGTHS, clients, corpus_prompts, run_coordinator, settings

ROLES = ("theta", "target")


# -- pure: the wire format --------------------------------------------------------------------
def test_chunks_round_trip():
    frame = wire.encode_chunks(wire.STEP, 7, 5, [3, 9], [[11], [12, 13, 14]])
    msg = wire.decode_chunks(frame)
    assert (msg.op, msg.msg_id, msg.k) == (wire.STEP, 7, 5)
    assert msg.sids.tolist() == [3, 9] and msg.per_session() == [[11], [12, 13, 14]]


def test_topk_round_trip_keeps_float32_values():
    ids = np.array([[5, 1], [2, 8]], dtype=np.int32)
    logp = np.array([[-0.1, -2.5], [-0.7, -0.9]], dtype=np.float32)
    op, msg_id, ids_back, logp_back = wire.decode_topk(wire.encode_topk(wire.OPEN, 4, ids, logp))
    assert (op, msg_id) == (wire.OPEN, 4)
    np.testing.assert_array_equal(ids_back, ids)
    np.testing.assert_array_equal(logp_back, logp)


def test_malformed_frames_are_refused():
    with pytest.raises(wire.SessionFormatError, match="do not add up"):
        wire.decode_chunks(np.array([2, 1, 5, 2, 3, 9, 1, 1, 11], dtype="<i4").tobytes())
    with pytest.raises(wire.SessionFormatError, match="unknown op"):
        wire.request_header(np.array([99, 1], dtype="<i4").tobytes())


# -- against real servers -----------------------------------------------------------------------
def request_counts(url: str) -> tuple[float, float]:
    """(running, waiting) requests from the server's Prometheus text."""
    return server_metrics(url, "vllm:num_requests_running", "vllm:num_requests_waiting")


def wait_for_counts(servers, done, roles=ROLES, timeout_s: float = 60.0
                    ) -> dict[str, tuple[float, float]]:
    """Poll the servers until `done((running, waiting))` holds for each, or time runs out.

    Blocking: from async code call it through `asyncio.to_thread`, so that the client's
    sockets keep answering the server's pings meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {role: request_counts(servers.url(role)) for role in roles}
        if all(done(c) for c in counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def assert_no_requests_left(servers) -> None:
    counts = wait_for_counts(servers, lambda c: c == (0.0, 0.0))
    assert all(c == (0.0, 0.0) for c in counts.values()), f"(running, waiting): {counts}"


@pytest.mark.server
def test_both_servers_offer_sessions(servers):
    async def go():
        async with VLLMClient(servers.url("theta")) as theta, \
                VLLMClient(servers.url("target")) as target:
            return await asyncio.gather(theta.describe(), target.describe())

    assert all(info.serves(wire.PATH) for info in asyncio.run(go()))


@pytest.mark.server
def test_transports_agree_token_for_token(servers):
    async def go():
        theta, target = clients(servers)
        async with theta, target:
            prompts = await corpus_prompts(theta)
            s = settings(concurrency=4, max_tokens=24, max_model_len=52)
            by_request = await run_coordinator(RequestTransport(theta, target), prompts, s)
            async with SessionTransport(theta, target) as transport:
                by_session = await run_coordinator(transport, prompts, s)
                # every sequence was released as it finished: nothing resident, socket open
                await asyncio.to_thread(assert_no_requests_left, servers)
        return by_request, by_session

    by_request, by_session = asyncio.run(go())
    assert sorted(by_request) == sorted(by_session) == list(range(len(PROMPT_LENGTHS)))
    lengths = {len(seq.completion_ids) for seq in by_request.values()}
    assert len(lengths) > 1, "sequences should finish at different steps"
    for index, seq in by_request.items():
        other = by_session[index]
        assert other.completion_ids == seq.completion_ids, f"prompt {index}"
        np.testing.assert_allclose(other.tokens["alpha"], seq.tokens["alpha"], atol=1e-6,
                                   err_msg=f"alpha of prompt {index}")
        np.testing.assert_allclose(other.tokens["logp_theta"], seq.tokens["logp_theta"],
                                   atol=1e-6, err_msg=f"logp_theta of prompt {index}")
    assert_no_requests_left(servers)


async def open_raw_sessions(http: aiohttp.ClientSession, servers, prompts: list[list[int]]):
    """A bare session socket on the theta server with `prompts` open: (ws, first top-k ids)."""
    ws = await http.ws_connect("ws" + servers.url("theta")[4:] + wire.PATH)
    await ws.send_bytes(wire.encode_chunks(wire.OPEN, 0, 20, list(range(len(prompts))),
                                           prompts))
    reply = await ws.receive(timeout=60)
    _, _, ids, _ = wire.decode_topk(reply.data)
    await asyncio.to_thread(wait_for_counts, servers, lambda c: sum(c) >= len(prompts),
                            ("theta",))
    return ws, ids


@pytest.mark.server
def test_abort_ends_every_session_of_the_socket(servers):
    async def go():
        theta, _ = clients(servers)
        async with theta, aiohttp.ClientSession() as http:
            prompts = await corpus_prompts(theta, (16, 24, 32))
            ws, _ = await open_raw_sessions(http, servers, prompts)
            resident = request_counts(servers.url("theta"))
            await ws.send_bytes(wire.encode_close(wire.ABORT, 5, []))
            ack = np.frombuffer((await ws.receive(timeout=60)).data, dtype="<i4").tolist()
            await asyncio.to_thread(assert_no_requests_left, servers)  # socket still open
            await ws.close()
        return resident, ack

    resident, ack = asyncio.run(go())
    assert sum(resident) >= 3, f"sessions should be resident before the abort: {resident}"
    assert ack == [wire.ABORT, 5, 3]


@pytest.mark.server
def test_socket_closed_mid_step_frees_every_session(servers):
    """A client that closes its socket with sessions open and a step in flight."""
    async def go():
        theta, _ = clients(servers)
        async with theta, aiohttp.ClientSession() as http:
            prompts = await corpus_prompts(theta, (16, 24, 32, 40))
            ws, ids = await open_raw_sessions(http, servers, prompts)
            resident = request_counts(servers.url("theta"))
            await ws.send_bytes(wire.encode_chunks(wire.STEP, 1, 20, list(range(len(prompts))),
                                                   [[int(i)] for i in ids[:, 0]]))
            await ws.close()
        return resident

    resident = asyncio.run(go())
    assert sum(resident) >= 4, f"sessions should be resident before the close: {resident}"
    assert_no_requests_left(servers)


CLIENT = textwrap.dedent("""
    import asyncio, sys
    from dual_sampling.clients.client import VLLMClient
    from dual_sampling.core.coordinator import Coordinator, PromptItem, SampleSettings
    from dual_sampling.core.transports.session import SessionTransport

    async def main(theta_url, target_url):
        theta, target = VLLMClient(theta_url, name="theta"), VLLMClient(target_url, name="target")
        async with theta, target:
            ids = await theta.tokenize("the quick brown fox jumps over the lazy dog " * 40)
            async def items():
                for i in range(6):
                    yield PromptItem(i, "", ids[i: i + 40])
            s = SampleSettings(top_k=20, max_tokens=1500, alpha=None, missing="kth",
                               concurrency=6, eos_token_ids=(), max_model_len=2048)
            def on_step(stats):
                print("stepped", flush=True)
            async def keep(seq):
                pass
            transport = SessionTransport(theta, target)
            await Coordinator(transport, s, keep, on_step=on_step).run(items())

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.server
def test_killed_client_frees_every_session(servers):
    """SIGKILL a coordinator process mid-run: its TCP connections drop with no close frame."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, servers.url("theta"),
                             servers.url("target")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few steps in
            line = proc.stdout.readline()
            assert line == "stepped\n", f"client failed: {line}{proc.stderr.read()[-2000:]}"
        resident = wait_for_counts(servers, lambda c: sum(c) >= 6)
    finally:
        proc.kill()
        proc.wait()
    assert all(sum(c) >= 6 for c in resident.values()), f"sessions not resident: {resident}"
    assert_no_requests_left(servers)


@pytest.mark.server
@pytest.mark.parametrize("contexts, k, message", [
    ([[5, 10 ** 6]], 5, "outside the vocabulary"),
    ([[5, 6]], 10 ** 4, "max-logprobs"),
])
def test_refusals_name_the_server_and_change_nothing(servers, contexts, k, message):
    async def go():
        theta, target = clients(servers)
        async with SessionTransport(theta, target) as transport:
            with pytest.raises(ServerError, match=message) as caught:
                await transport.step([0], contexts, k)
            assert servers.url("theta") in str(caught.value) or \
                servers.url("target") in str(caught.value)
            ids_theta, *_ = await transport.step([1], [[5, 6, 7]], 3)  # the socket still works
            assert ids_theta.shape == (1, 3)

    asyncio.run(go())
    assert_no_requests_left(servers)
