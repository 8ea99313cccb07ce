"""perplexity mode: the window plan (pure), and end to end against the session's real theta
server, checked against the transformers reference on the same weights and text."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from hypothesis import example, given, settings, strategies as st

from dual_sampling.clients.client import VLLMClient
from dual_sampling.config import (PerplexityParams, PerplexityRunConfig, SequenceDataConfig,
                                  ServerConfig, WandbConfig)
from dual_sampling.errors import DataError, ServerError, ServerMismatchError
from dual_sampling.models.tiny_models import corpus_path
from dual_sampling.modes import perplexity
from dual_sampling.modes.perplexity import plan_windows, preflight

CORPUS_CHARS = 12_000  # about 3,950 tokens of the shipped corpus


def guide_scored_counts(num_tokens: int, context_length: int, stride: int) -> np.ndarray:
    """How often each position is scored, by the guide's loop transcribed literally: labels
    -100 before the last trg_len, then the model's shift drops each window's first label."""
    counts = np.zeros(num_tokens, dtype=np.int64)  # (L,)
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        labels = np.arange(begin, end)[-(end - prev_end):]  # positions not masked to -100
        counts[labels[labels > begin]] += 1
        prev_end = end
        if end == num_tokens:
            break
    return counts


def plan_counts(num_tokens: int, context_length: int, stride: int) -> np.ndarray:
    counts = np.zeros(num_tokens, dtype=np.int64)  # (L,)
    for w in plan_windows(num_tokens, context_length, stride):
        assert w.begin < w.score_from < w.end <= w.begin + context_length
        counts[w.score_from:w.end] += 1
    return counts


@settings(max_examples=300, deadline=None)
@given(stride=st.integers(1, 300), extra_context=st.integers(1, 300), windows=st.integers(0, 30),
       remainder=st.sampled_from([0, 1, None]), data=st.data())
@example(stride=64, extra_context=192, windows=16, remainder=0, data=None)  # 1024 = 16 * 64
@example(stride=64, extra_context=192, windows=15, remainder=40, data=None)  # 1000
@example(stride=1, extra_context=1, windows=5, remainder=0, data=None)
def test_stride_below_context_scores_every_token_after_the_first_once(
        stride, extra_context, windows, remainder, data):
    """Lengths that are (remainder 0) and are not multiples of the stride."""
    if remainder is None:
        remainder = data.draw(st.integers(1, stride - 1)) if stride > 1 else 0
    num_tokens = max(1, windows * stride + remainder)
    context_length = stride + extra_context
    counts = plan_counts(num_tokens, context_length, stride)
    assert counts[0] == 0 and np.all(counts[1:] == 1)
    np.testing.assert_array_equal(counts, guide_scored_counts(num_tokens, context_length, stride))


@settings(max_examples=200, deadline=None)
@given(context_length=st.integers(2, 300), num_tokens=st.integers(1, 3000))
@example(context_length=256, num_tokens=1024)
@example(context_length=256, num_tokens=1025)
def test_stride_equal_to_context_skips_only_each_windows_first_token(context_length, num_tokens):
    """No overlap: a window's first token has no context; everything else is scored once."""
    counts = plan_counts(num_tokens, context_length, context_length)
    np.testing.assert_array_equal(np.flatnonzero(counts == 0),
                                  np.arange(0, num_tokens, context_length))
    assert counts.max(initial=1) == 1
    np.testing.assert_array_equal(
        counts, guide_scored_counts(num_tokens, context_length, context_length))


def make_config(url: str, paths: list[Path], out: Path, context_length: int, stride: int,
                **ppl) -> PerplexityRunConfig:
    return PerplexityRunConfig(
        output_dir=str(out), model=ServerConfig(url=url, max_retries=ppl.pop("max_retries", 2)),
        data=SequenceDataConfig(path=[str(p) for p in paths]),
        ppl=PerplexityParams(context_length=context_length, stride=stride, **ppl),
        wandb=WandbConfig(mode="disabled"), progress=False)


def test_empty_corpus_fails_before_any_request(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(DataError, match="empty.txt"):
        perplexity.run(make_config("http://127.0.0.1:9", [empty], tmp_path / "o", 64, 32))


def test_unreachable_server_fails_before_scoring(tmp_path):
    from conftest import free_port
    down = f"http://127.0.0.1:{free_port()}"
    text = tmp_path / "c.txt"
    text.write_text("Some text.")
    with pytest.raises(ServerError, match=f"model server at {down}.*failed after 2 attempt"):
        perplexity.run(make_config(down, [text], tmp_path / "o", 64, 32, max_retries=1))
    assert not (tmp_path / "o").exists()


def test_server_with_processed_logprobs_is_refused():
    """A forced token must read its raw logprob; a processed mode gives 0.0, silently wrong."""
    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        rows = [None] + [{str(t): {"logprob": -2.0, "rank": 3}} for t in body["prompt"][1:]]
        forced = body["allowed_token_ids"][0]
        return web.json_response({"choices": [{"prompt_logprobs": rows, "logprobs": {
            "tokens": [f"token_id:{forced}"], "token_logprobs": [0.0]}}]})

    def answer(payload: dict):
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(payload)
        return handler

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/v1/models", answer({"data": [{"id": "m", "max_model_len": 512}]}))
        app.router.add_get("/v1/dual_sampling/info", answer(
            {"bos_token_id": 0, "eos_token_ids": [1], "vocab_size": 16}))
        app.router.add_post("/tokenize", answer({"tokens": [3, 4, 5, 6]}))
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with VLLMClient(url, name="model") as client:
                await preflight(client, PerplexityParams(context_length=256, stride=128))
        finally:
            await runner.cleanup()

    with pytest.raises(ServerMismatchError, match="--logprobs-mode raw_logprobs"):
        asyncio.run(go())


# -- against the real theta server ------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_path().read_text(encoding="utf-8")[:CORPUS_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(servers):
    from dual_sampling.models.reference import Reference
    return Reference(servers.models)


@pytest.mark.server
@pytest.mark.parametrize("context_length,stride,add_bos", [
    (256, 256, True),  # no overlap
    (256, 64, True),
    (256, 100, False),  # corpus length not a multiple of the stride, no BOS
    (2048, 1024, True),  # windows of exactly the server's max-model-len: the stock route
])
def test_perplexity_equals_transformers_reference(servers, reference, corpus, tmp_path,
                                                 context_length, stride, add_bos):
    result = perplexity.run(make_config(servers.url("theta"), [corpus], tmp_path, context_length,
                                        stride, add_bos=add_bos, concurrency=4))
    ids = reference.tokenizer(corpus.read_text(encoding="utf-8"),
                              add_special_tokens=add_bos)["input_ids"]
    assert (ids[0] == reference.tokenizer.bos_token_id) == add_bos
    total_nll, n_scored = reference.sliding_window_nll("theta", ids, context_length, stride)
    # the plugin's binary route where a window leaves the generated slot free, else stock
    assert result["route"].startswith("/v1/topk" if context_length < 2048 else "/v1/completions")
    got = result["corpora"][0]
    assert got["corpus_tokens"] == len(ids)
    assert got["num_tokens"] == n_scored
    if stride < context_length:
        assert n_scored == len(ids) - 1
    assert got["num_windows"] == len(plan_windows(len(ids), context_length, stride))
    assert got["perplexity"] == pytest.approx(math.exp(total_nll / n_scored), rel=1e-4)
    assert result["overall"]["perplexity"] == got["perplexity"]
    windows = [json.loads(line) for line in (tmp_path / "windows.jsonl").read_text().splitlines()]
    assert len(windows) == got["num_windows"]
    assert sum(w["num_scored"] for w in windows) == n_scored
    assert sum(w["nll_sum"] for w in windows) == pytest.approx(total_nll, rel=1e-4)


@pytest.mark.server
def test_two_corpora_are_token_weighted(servers, corpus, tmp_path):
    second = tmp_path / "second.txt"
    second.write_text(corpus_path().read_text(encoding="utf-8")[-4000:], encoding="utf-8")
    result = perplexity.run(make_config(servers.url("theta"), [corpus, second], tmp_path / "o",
                                        256, 128))
    parts = result["corpora"]
    assert [p["corpus"] for p in parts] == [str(corpus), str(second)]
    tokens = sum(p["num_tokens"] for p in parts)
    assert result["overall"]["num_tokens"] == tokens
    assert result["overall"]["mean_nll"] == pytest.approx(
        sum(p["mean_nll"] * p["num_tokens"] for p in parts) / tokens, rel=1e-12)


@pytest.mark.server
def test_context_over_max_model_len_fails_before_scoring(servers, corpus, tmp_path):
    url = servers.url("theta")
    with pytest.raises(ServerMismatchError, match=rf"ppl.context_length.*4096.*2048.*{url}"):
        perplexity.run(make_config(url, [corpus], tmp_path / "o", 4096, 512))
    assert not (tmp_path / "o").exists()


def run_cli(cwd: Path, *overrides: str, sweep: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dual_sampling", *(["-m"] if sweep else []),
                           "mode=perplexity", "progress=false", "wandb.mode=offline", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.server
def test_hydra_run_and_sweep(servers, corpus, tmp_path):
    common = (f"model.url={servers.url('theta')}", f"data.path={corpus}",
              "ppl.context_length=256")
    done = run_cli(tmp_path, *common, "ppl.stride=128", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "perplexity.json").read_text())
    assert result["stride"] == 128 and result["overall"]["perplexity"] > 1
    assert "| overall" in done.stdout and (tmp_path / "run" / "wandb").is_dir()

    done = run_cli(tmp_path, *common, "ppl.stride=128,256", f"output_dir={tmp_path / 'sweep'}",
                   sweep=True)
    assert done.returncode == 0, done.stderr[-3000:]
    swept = [json.loads((tmp_path / "sweep" / f"job{i}" / "perplexity.json").read_text())
             for i in range(2)]
    assert [r["stride"] for r in swept] == [128, 256]
    assert swept[0]["overall"]["perplexity"] == pytest.approx(result["overall"]["perplexity"],
                                                              rel=1e-6)

    done = run_cli(tmp_path, *common, "ppl.stride=300", f"output_dir={tmp_path / 'bad'}")
    assert done.returncode == 2 and "ppl.stride" in done.stderr
