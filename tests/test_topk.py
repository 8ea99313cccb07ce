"""topk: the binary format (pure), and /v1/topk, its fallback, the cache and the Dataset
against a real vLLM CPU server with the plugin (the session `servers` fixture).

The cache run goes through the real entry point (`python -m dual_sampling mode=topk`) as a
subprocess, so a SIGKILL midway is a real kill.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dual_sampling.clients.client import VLLMClient
from dual_sampling.wire.topk_format import (FORMATS, EncodedTopk, TopkFormatError, decode_body,
                                       encode_body, encode_sequence, error_bound,
                                       id_dtype_for_vocab, read_index)
from helpers import topk_of

K = 32
FLOAT_TOL = 1e-3


# -- the format, no server -----------------------------------------------------------------
def sorted_rows(logp: np.ndarray) -> np.ndarray:
    return -np.sort(-logp, axis=-1)


logprob_rows = arrays(
    np.float32, st.tuples(st.integers(0, 6), st.integers(1, 40)),
    elements=st.one_of(st.floats(-80.0, 0.0, width=32), st.just(-np.inf)))


@settings(max_examples=300, deadline=None)
@given(logprob_rows, st.sampled_from(FORMATS))
def test_roundtrip_error_within_documented_bound(logp, fmt):
    logp = sorted_rows(logp)
    n, k = logp.shape
    ids = np.arange(n * k).reshape(n, k) % 1000
    actual = logp[:, 0] if k else np.zeros(n, np.float32)
    seq = EncodedTopk.encode(ids, logp, actual, fmt, id_dtype_for_vocab(1000))
    assert seq.record_size == len(encode_sequence(seq))
    header, (back,) = decode_body(encode_body([seq], k, fmt, 1000))
    decoded = back.decode()
    assert (header.n_seq, header.k, header.fmt) == (1, k, fmt)
    np.testing.assert_array_equal(decoded.ids, ids)
    np.testing.assert_array_equal(decoded.actual, actual)  # float32, exact
    inf = np.isneginf(logp)
    np.testing.assert_array_equal(np.isneginf(decoded.logp), inf)
    err = np.abs(np.where(inf, 0.0, decoded.logp) - np.where(inf, 0.0, logp).astype(np.float64))
    assert (err <= error_bound(logp, fmt)).all(), (err.max(), fmt)


def test_int8_bound_is_tight_and_order_kept():
    logp = np.linspace(0.0, -10.0, 1000, dtype=np.float32)[None]  # hi - lo = 10
    decoded = EncodedTopk.encode(np.zeros((1, 1000)), logp, logp[:, 0], "int8",
                                 np.dtype("<u2")).logprobs()
    err = np.abs(decoded - logp)
    assert err.max() <= 10 / 508 + 1e-5
    assert err.max() > 0.5 * 10 / 508  # the bound is not loose by much
    assert (np.diff(decoded[0]) <= 0).all()


def test_id_dtype_is_the_narrowest():
    assert id_dtype_for_vocab(1024) == np.dtype("<u2")
    assert id_dtype_for_vocab(65536) == np.dtype("<u2")
    assert id_dtype_for_vocab(65537) == np.dtype("<i4")
    big = EncodedTopk.encode(np.array([[150_000]]), np.zeros((1, 1)), np.zeros(1), "int8",
                             id_dtype_for_vocab(151_000))
    (_, (back,)) = decode_body(encode_body([big], 1, "int8", 151_000))
    assert back.decode().ids[0, 0] == 150_000


def test_several_sequences_and_a_one_token_sequence():
    rng = np.random.default_rng(0)
    seqs = []
    for n in (3, 0, 5):
        logp = sorted_rows(rng.normal(-5, 2, (n, 4)).clip(max=0).astype(np.float32))
        seqs.append(EncodedTopk.encode(rng.integers(0, 50, (n, 4)), logp,
                                       rng.normal(size=n), "fp16", np.dtype("<u2")))
    _, back = decode_body(encode_body(seqs, 4, "fp16", 50))
    assert [s.record_size for s in seqs] == [len(encode_sequence(s)) for s in seqs]
    assert [s.num_rows for s in back] == [3, 0, 5]
    np.testing.assert_array_equal(back[2].values, seqs[2].values)


def test_raw_prompt_logprobs_keep_engine_arrays_and_leave_other_requests_alone():
    """The /v1/topk fast path (dual_sampling/vllm_plugin/raw_logprobs.py) on vLLM's own
    LogprobsProcessor: a marked request stores the engine's arrays per chunk, an unmarked
    one still gets vLLM's flat lists. The route's end-to-end values are checked against
    transformers in test_topk_route_matches_transformers_reference."""
    import torch
    from vllm.logprobs import FlatLogprobs, create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from dual_sampling.vllm_plugin.raw_logprobs import RawPromptLogprobs, install
    assert install() and install()  # this vLLM has the methods; twice is harmless
    rows = [  # two prefill chunks: (token ids, logprobs, ranks), actual token in column 0
        (torch.tensor([[5, 5, 9], [7, 2, 7]]), torch.tensor([[-1., -1., -2.], [-3., -.5, -3.]]),
         torch.tensor([1, 2])),
        (torch.tensor([[4, 4, 1]]), torch.tensor([[-.1, -.1, -3.]]), torch.tensor([1]))]

    def processor(container):
        return LogprobsProcessor(tokenizer=None, logprobs=None, prompt_logprobs=container,
                                 cumulative_logprob=None, num_logprobs=None,
                                 num_prompt_logprobs=2)
    raw = processor(RawPromptLogprobs())
    flat = processor(create_prompt_logprobs(True))
    for chunk in rows:
        raw._update_prompt_logprobs(chunk)
        flat._update_prompt_logprobs(chunk)
    ids, logp = raw.prompt_logprobs.arrays()
    assert ids.tolist() == [[5, 5, 9], [7, 2, 7], [4, 4, 1]] and logp.dtype == np.float32
    assert isinstance(flat.prompt_logprobs, FlatLogprobs) and len(flat.prompt_logprobs) == 4
    assert np.array_equal(np.asarray(flat.prompt_logprobs.token_ids), ids.ravel())


@pytest.mark.parametrize("corrupt", [
    lambda b: b[:10], lambda b: b"XXXX" + b[4:], lambda b: b[:-4], lambda b: b + b"\0\0\0\0"])
def test_malformed_bodies_raise_format_error(corrupt):
    seq = EncodedTopk.encode(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), "int8",
                             np.dtype("<u2"))
    with pytest.raises(TopkFormatError):
        decode_body(corrupt(encode_body([seq], 3, "int8", 10)))


# -- against a real server -----------------------------------------------------------------
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the standard library module was small, and it grew with every release.",
    "A short one.",
    "Numbers like 12345 and 678 appear in text, and so do names like Alice and Bob.",
]


@pytest.fixture(scope="module")
def reference(tiny_models):
    from dual_sampling.models.reference import Reference
    return Reference(tiny_models)


@pytest.fixture(scope="module")
def sequences(reference):
    return [reference.tokenizer(text)["input_ids"] for text in TEXTS]


def assert_matches_reference(results, sequences, reference, fmt):
    for ids, result in zip(sequences, results):
        full = reference.full_logprobs("theta", ids)[:-1]  # (L-1, V): row j scores token j+1
        n = len(ids) - 1
        assert result.ids.shape == result.logp.shape == (n, K) and result.actual.shape == (n,)
        exact = np.take_along_axis(full, result.ids, axis=-1)  # (L-1, K)
        bound = error_bound(exact, fmt) + FLOAT_TOL
        assert (np.abs(result.logp - exact) <= bound).all()
        np.testing.assert_allclose(result.actual, full[np.arange(n), ids[1:]], atol=FLOAT_TOL)
        # the same top-k set as the reference, ties aside: nothing left out scores higher
        kth = np.sort(full, axis=-1)[:, -K]  # (L-1,)
        assert (exact >= kth[:, None] - FLOAT_TOL).all()
        # and the same ids in the same order in rows without near-ties among the top k+1
        ref_ids = np.argsort(-full, axis=-1, kind="stable")[:, :K + 1]  # (L-1, K+1)
        gaps = -np.diff(np.take_along_axis(full, ref_ids, axis=-1), axis=-1)  # (L-1, K)
        clear = (gaps > FLOAT_TOL).all(axis=-1)
        np.testing.assert_array_equal(result.ids[clear], ref_ids[clear, :K])
        assert (np.diff(result.logp, axis=-1) <= 0).all()  # by decreasing logprob


@pytest.mark.server
@pytest.mark.parametrize("fmt", FORMATS)
def test_topk_route_matches_transformers_reference(servers, sequences, reference, fmt):
    results = topk_of(servers.url("theta"), sequences, fmt=fmt)
    assert_matches_reference(results, sequences, reference, fmt)


@pytest.mark.server
def test_fallback_to_stock_prompt_logprobs_gives_the_same_arrays(servers, sequences, reference,
                                                                 caplog):
    async def go():
        async with VLLMClient(servers.url("theta"), name="teacher") as client:
            fast = await client.prompt_topk(sequences, K)
            client._topk_route_missing = False
            real_request = client.request

            async def without_route(method, path, *args, **kwargs):  # a server without the plugin
                if path == "/v1/topk":
                    return await real_request(method, "/v1/no_such_route", *args, **kwargs)
                return await real_request(method, path, *args, **kwargs)

            client.request = without_route
            first = await client.prompt_topk(sequences, K)
            second = await client.prompt_topk(sequences[:1], K)
            return fast, first, second

    fast, slow, again = asyncio.run(go())
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1
    assert_matches_reference(slow, sequences, reference, "int8")
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.actual, b.actual, atol=FLOAT_TOL)
        same = a.ids == b.ids  # positions of tied logprobs may swap
        assert same.mean() > 0.95
        np.testing.assert_allclose(a.logp, b.logp, atol=2 * error_bound(a.logp, "int8").max())
    np.testing.assert_array_equal(again[0].ids, slow[0].ids)


def post_topk(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/topk", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.server
@pytest.mark.parametrize("body, needle", [
    ({"sequences": [[1, 2, 3]], "k": 100_000}, "max-logprobs"),
    ({"sequences": [], "k": 4}, "empty"),
    ({"sequences": [[1, 2], []], "k": 4}, "sequence 1 is empty"),
    ({"sequences": [[1, 2, 5_000_000]], "k": 4}, "outside the vocabulary"),
    ({"sequences": [[1, -3]], "k": 4}, "outside the vocabulary"),
    ({"sequences": [[1] * 2048], "k": 4}, "max-model-len"),
    ({"sequences": [[1, 2]], "k": 4, "format": "int4"}, "format"),
    ({"sequences": "nope", "k": 4}, "sequences"),
])
def test_bad_requests_get_4xx_and_the_server_stays_up(servers, body, needle):
    url = servers.url("theta")
    status, reply = post_topk(url, body)
    assert 400 <= status < 500
    assert needle in json.dumps(reply)
    with urllib.request.urlopen(url + "/health", timeout=10) as health:
        assert health.status == 200
    assert post_topk(url, {"sequences": [[1, 2, 3]], "k": 2})[0] == 200


@pytest.mark.server
def test_json_response_holds_the_binary_values(servers, sequences):
    body = {"sequences": sequences[:2], "k": 8, "format": "bf16", "response": "json"}
    request = urllib.request.Request(servers.url("theta") + "/v1/topk",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        parsed = json.loads(reply.read())
    binary = topk_of(servers.url("theta"), sequences[:2], k=8, fmt="bf16")
    for entry, result in zip(parsed["sequences"], binary):
        np.testing.assert_array_equal(np.array(entry["ids"]), result.ids)
        np.testing.assert_array_equal(np.array(entry["logprobs"], dtype=np.float32), result.logp)
        np.testing.assert_array_equal(np.array(entry["actual"], dtype=np.float32), result.actual)


# -- the cache: resume after a kill, round trip through the Dataset --------------------------
def topk_cmd(servers, inputs: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "dual_sampling", "mode=topk",
            f"teacher.url={servers.url('theta')}", f"data.path={inputs}", f"output_dir={out}",
            f"topk.k={K}", "topk.batch_size=2", "topk.concurrency=1", "topk.shard_size=4",
            "progress=false", "wandb.mode=disabled", *overrides]


@pytest.mark.server
def test_cache_resumes_after_sigkill_with_every_sequence_once(servers, tmp_path, reference):
    texts = [f"Sequence {i}: " + TEXTS[i % len(TEXTS)] for i in range(40)]
    inputs = tmp_path / "inputs.jsonl"
    # texts and token ids in one file: both kinds of input
    inputs.write_text("".join(
        json.dumps({"token_ids": reference.tokenizer(t)["input_ids"]} if i % 3 == 0 else
                   {"text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "cache"
    proc = subprocess.Popen(topk_cmd(servers, inputs, out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(out.glob("shard-*.safetensors")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob("shard-*.safetensors"))  # maybe not indexed yet: resume indexes it
    assert sum(len(e["sequence_ids"]) for e in read_index(out)) < len(texts)

    done = subprocess.run(topk_cmd(servers, inputs, out), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = sorted(i for e in read_index(out) for i in e["sequence_ids"])
    assert ids == list(range(len(texts)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_sequences"] == len(texts)
    assert manifest["k"] == K and manifest["dtype"] == "int8"
    assert Path(manifest["model_root"]).name == "theta"
    assert not list(out.glob("*.tmp"))

    from dual_sampling.files.topk_dataset import TopkDataset
    dataset = TopkDataset(out)
    assert len(dataset) == len(texts)
    for i in (0, 1, 17, 39):
        item = dataset[i]
        expected = reference.tokenizer(texts[i])["input_ids"]
        assert item["sequence_id"] == i and item["input_ids"].tolist() == expected
        n = len(expected) - 1
        assert item["topk_ids"].shape == item["topk_logprobs"].shape == (n, K)
        assert item["actual_logprobs"].shape == (n,)
        assert str(item["topk_ids"].dtype) == "torch.int64"
        direct = topk_of(servers.url("theta"), [expected])[0]
        np.testing.assert_array_equal(item["topk_ids"].numpy(), direct.ids)
        np.testing.assert_array_equal(item["topk_logprobs"].numpy(), direct.logp)
        np.testing.assert_array_equal(item["actual_logprobs"].numpy(), direct.actual)

    again = subprocess.run(topk_cmd(servers, inputs, out), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0
    assert sum(len(e["sequence_ids"]) for e in read_index(out)) == len(texts)
    other_k = subprocess.run(topk_cmd(servers, inputs, out, "topk.k=8"), capture_output=True,
                             text=True, timeout=600)
    assert other_k.returncode == 2 and "other settings" in other_k.stderr


def test_cache_writer_repairs_every_kill_point_and_reads_back(tmp_path):
    """Killed mid-shard (a .tmp), between rename and index line, mid index line: all repaired."""
    from dual_sampling.modes.topk import CacheWriter
    from dual_sampling.files.topk_dataset import TopkDataset

    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 3, 7]
    inputs = [rng.integers(0, 100, n).tolist() for n in lengths]
    encoded = [EncodedTopk.encode(rng.integers(0, 100, (n - 1, 4)),
                                  sorted_rows(-rng.exponential(3, (n - 1, 4))),
                                  -rng.exponential(3, n - 1), "int8", np.dtype("<i4"))
               for n in lengths]  # int32 ids, as the fallback path gives: stored as uint16

    def writer():
        return CacheWriter(tmp_path, 4, "int8", np.dtype("<u2"),
                           {"k": 4, "settings": {"shard_size": 2}})

    async def fill():
        cache = writer()
        await cache.add([10, 11, 12], inputs[:3], encoded[:3])
        await cache.add([13, 14], inputs[3:], encoded[3:])
        await cache.flush()
        return cache

    assert asyncio.run(fill()).num_shards == 3
    index = tmp_path / "index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # last line lost, half written
    (tmp_path / "shard-000004.safetensors.tmp").write_bytes(b"half a shard")
    cache = writer()
    assert cache.done == set(range(10, 15)) and cache.num_shards == 3 and cache.next_number == 4
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(i for e in read_index(tmp_path) for i in e["sequence_ids"]) == list(range(10, 15))
    cache.write_manifest()

    dataset = TopkDataset(tmp_path)
    assert len(dataset) == 5
    for i, (ids, seq) in enumerate(zip(inputs, encoded)):
        item = dataset[i]
        assert item["sequence_id"] == 10 + i and item["input_ids"].tolist() == ids
        decoded = seq.decode()
        np.testing.assert_array_equal(item["topk_ids"].numpy(), decoded.ids)
        np.testing.assert_array_equal(item["topk_logprobs"].numpy(), decoded.logp)
        np.testing.assert_array_equal(item["actual_logprobs"].numpy(), decoded.actual)
