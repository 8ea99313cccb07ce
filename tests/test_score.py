"""score mode: the pure pieces, then end to end against the session's real theta and target
servers, every score checked against transformers on the same weights."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from hypothesis import given, settings, strategies as st

from dual_sampling.config import (ScoreDataConfig, ScoreParams, ScoreRunConfig, ServerConfig,
                                  WandbConfig)
from dual_sampling.core.score_job import Group, plan_batches
from dual_sampling.errors import DataError, ServerMismatchError
from dual_sampling.files.data import read_score_items
from dual_sampling.files.records import read_records
from dual_sampling.maths import scoring
from dual_sampling.modes import score

SUM_TOLERANCE = 1e-4
# A prompt ending in a partial word: naive string concatenation would merge "f" and "unction".
BOUNDARY = {"prompt": "Python has a f", "completion": "unction"}
CHAT = {"messages": [{"role": "user", "content": "Name a module."}],
        "completion": "The os module is in the standard library."}
LABELS = {"prompt": "Is the sky green? Answer:", "completions": [" True", " False", " Maybe so"]}
PAIRS = [BOUNDARY, CHAT, LABELS,
         {"prompt": "The standard library", "completion": " has a module for every task."},
         {"prompt_token_ids": [0, 485, 286], "completion_token_ids": [[86, 90], [269]]},
         {"prompt": "word " * 2100, "completion": "too long"},  # over max-model-len 2048
         {"prompt": "Another prompt,", "completion": " and a completion of a few tokens."}]
TOO_LONG = 5


# -- pure --------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(groups=st.lists(st.lists(st.lists(st.floats(-20, 0), min_size=1, max_size=5),
                                min_size=1, max_size=4), min_size=1, max_size=6))
def test_sums_and_group_probabilities_match_a_loop(groups):
    sequences = [seq for group in groups for seq in group]
    sums = scoring.sequence_sums(np.array([len(s) for s in sequences]),
                                 np.concatenate([np.array(s) for s in sequences]))
    np.testing.assert_allclose(sums, [sum(s) for s in sequences], atol=1e-9)
    probs = scoring.normalise_within_groups(sums, np.array([len(g) for g in groups]))
    start = 0
    for group in groups:
        part = np.array([sum(s) for s in group])
        want = np.exp(part - part.max()) / np.exp(part - part.max()).sum()
        np.testing.assert_allclose(probs[start:start + len(group)], want, rtol=1e-9)
        start += len(group)


def test_batches_keep_a_prompts_completions_together(tmp_path):
    items = read_score_items(write_pairs(tmp_path / "p.jsonl", [LABELS, BOUNDARY] * 3))
    groups = [Group(item, None, [0], [[1]] * len(item.completions)) for item in items]
    batches = plan_batches(groups, batch_size=4)
    assert [len(b) for b in batches] == [2, 2, 2]
    assert [g for b in batches for g in b] == groups
    assert [len(b) for b in plan_batches(groups, batch_size=1)] == [1] * 6  # a group goes alone


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p"}, "no `completion` string"),
    ({"prompt": "p", "completion": ""}, "completion 0 is empty"),
    ({"prompt": "p", "completions": [" a", ""]}, "completion 1 is empty"),
    ({"prompt": "p", "completions": []}, "non-empty list of strings"),
    ({"completion": "c"}, "no non-empty `prompt_token_ids`"),
    ({"prompt": "p", "completion_token_ids": []}, "non-empty list of token ids"),
])
def test_bad_records_are_named_with_file_and_line(tmp_path, record, message):
    path = write_pairs(tmp_path / "p.jsonl", [BOUNDARY, record])
    with pytest.raises(DataError, match=rf"p.jsonl:2: .*{message}"):
        read_score_items(path)


def test_samples_jsonl_reads_with_its_token_ids(tmp_path):
    sample = {"index": 0, "prompt": "Hi", "completion": " there", "prompt_token_ids": [0, 5],
              "completion_token_ids": [7, 8], "logp_theta": [-1.0, -2.0]}
    (item,) = read_score_items(write_pairs(tmp_path / "samples.jsonl", [sample]))
    assert (item.prompt_token_ids, item.completion_token_ids) == ([0, 5], [[7, 8]])
    assert item.completions == [" there"] and not item.labels


def test_servers_that_tokenise_differently_are_refused_before_scoring(tmp_path):
    """Two fake servers alike in everything but the ids of the probe text."""
    def answer(payload: dict):
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(payload)
        return handler

    async def serve(probe_ids: list[int]) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_get("/v1/models", answer({"data": [{"id": "m", "max_model_len": 512}]}))
        app.router.add_get("/v1/dual_sampling/info", answer(
            {"bos_token_id": 0, "eos_token_ids": [1], "vocab_size": 16, "routes": []}))
        app.router.add_post("/tokenize", answer({"tokens": probe_ids}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def go() -> None:
        (a, url_a), (b, url_b) = await serve([0, 3, 4]), await serve([0, 3, 5])
        config = ScoreRunConfig(
            output_dir=str(tmp_path / "out"), theta=ServerConfig(url=url_a),
            target=ServerConfig(url=url_b),
            data=ScoreDataConfig(path=str(write_pairs(tmp_path / "p.jsonl", [BOUNDARY]))),
            wandb=WandbConfig(mode="disabled"), progress=False)
        try:
            await score._run(config)
        finally:
            await a.cleanup()
            await b.cleanup()

    with pytest.raises(ServerMismatchError, match="different tokenizers"):
        asyncio.run(go())
    assert not (tmp_path / "out" / "scores.jsonl").exists()


# -- against the real servers ------------------------------------------------------------

def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_config(servers, path: Path, out: Path, target: bool = True, **params) -> ScoreRunConfig:
    return ScoreRunConfig(
        output_dir=str(out), theta=ServerConfig(url=servers.url("theta")),
        target=ServerConfig(url=servers.url("target") if target else None),
        data=ScoreDataConfig(path=str(path)), score=ScoreParams(**params),
        wandb=WandbConfig(mode="disabled"), progress=False)


@pytest.fixture(scope="module")
def reference(servers):
    from dual_sampling.models.reference import Reference
    return Reference(servers.models)


@pytest.fixture(scope="module")
def scored(servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    pairs = write_pairs(tmp / "pairs.jsonl", PAIRS)
    result = score.run(make_config(servers, pairs, tmp / "out", batch_size=4))
    return tmp, pairs, result, list(read_records(tmp / "out" / "scores.jsonl"))


def expected_ids(reference, record: dict) -> tuple[list[int], list[list[int]]]:
    """Prompt and completion ids by the tokenisation rule, with transformers' tokenizer."""
    tok = reference.tokenizer
    if "prompt_token_ids" in record:
        return record["prompt_token_ids"], record["completion_token_ids"]
    if "messages" in record:
        prompt = tok.apply_chat_template(record["messages"], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    else:
        prompt = tok(record["prompt"])["input_ids"]
    texts = record.get("completions") or [record["completion"]]
    return prompt, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.server
def test_every_score_equals_transformers(scored, reference):
    _, _, result, records = scored
    by_key = {(r["index"], r["completion_index"]): r for r in records}
    assert len(by_key) == len(records) == 9  # 5 single + 3 labels + 2 given ids - 1 skipped
    for index, pair in enumerate(PAIRS):
        if index == TOO_LONG:
            continue
        prompt, completions = expected_ids(reference, pair)
        sums = {"theta": [], "target": []}
        for c, ids in enumerate(completions):
            record = by_key[(index, c)]
            assert record["prompt_token_ids"] == prompt
            assert record["completion_token_ids"] == ids and record["num_tokens"] == len(ids)
            rows = np.arange(len(prompt) - 1, len(prompt) + len(ids) - 1)  # (m,)
            for model in ("theta", "target"):
                want = reference.full_logprobs(model, prompt + ids)[rows, ids]  # (m,)
                np.testing.assert_allclose(record[f"logp_{model}"], want, atol=SUM_TOLERANCE)
                assert record[f"sum_logp_{model}"] == pytest.approx(want.sum(), abs=SUM_TOLERANCE)
                assert record[f"mean_logp_{model}"] == pytest.approx(want.mean(),
                                                                     abs=SUM_TOLERANCE)
                sums[model].append(want.sum())
            assert record["log_w"] == pytest.approx(
                record["sum_logp_target"] - record["sum_logp_theta"], abs=1e-12)
        if len(completions) > 1:  # the label case: probabilities over the prompt's completions
            for model in ("theta", "target"):
                got = [by_key[(index, c)][f"label_prob_{model}"] for c in range(len(completions))]
                want = np.exp(sums[model]) / np.exp(sums[model]).sum()
                np.testing.assert_allclose(got, want, rtol=1e-4)
        else:
            assert "label_prob_theta" not in by_key[(index, 0)]
    assert result["route_theta"] == result["route_target"] == "/v1/topk (k=1, binary)"


@pytest.mark.server
def test_the_completion_starts_a_new_token_after_the_prompt(scored, reference):
    """Naive string concatenation would merge the prompt's last token with the first one."""
    _, _, _, records = scored
    record = next(r for r in records if r["index"] == 0)
    tok = reference.tokenizer
    naive = tok(BOUNDARY["prompt"] + BOUNDARY["completion"])["input_ids"]
    assert naive != record["prompt_token_ids"] + record["completion_token_ids"]
    assert record["prompt_token_ids"] == tok(BOUNDARY["prompt"])["input_ids"]
    assert record["completion_token_ids"] == tok(BOUNDARY["completion"],
                                                 add_special_tokens=False)["input_ids"]


@pytest.mark.server
def test_summary_names_the_skipped_record_and_the_routes(scored):
    tmp, _, result, records = scored
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary["num_skipped"] == 1
    (skip,) = summary["skipped"]
    assert skip["index"] == TOO_LONG and "pairs.jsonl:6" in skip["where"]
    assert "over the 2048" in skip["reason"] and "--max-model-len" in skip["reason"]
    assert all(r["index"] != TOO_LONG for r in records)
    tokens = sum(r["num_tokens"] for r in records)
    assert summary["num_tokens"] == tokens and summary["num_records"] == len(records)
    for model in ("theta", "target"):
        assert summary[f"mean_nll_{model}"] == pytest.approx(
            -sum(r[f"sum_logp_{model}"] for r in records) / tokens, rel=1e-9)
    assert 0 < summary["ess_fraction"] <= 1 and summary["tokens_per_s"] > 0
    assert {(r["theta_version"], r["theta_path"]) for r in records} == {
        (summary["theta_version"], summary["theta_path"])}


@pytest.mark.server
def test_stock_route_theta_only_without_per_token_lists(servers, scored, tmp_path):
    _, pairs, _, records = scored
    result = score.run(make_config(servers, pairs, tmp_path, target=False, route="stock",
                                   per_token=False))
    assert result["route_theta"] == "/v1/completions (prompt_logprobs=0)"
    assert "route_target" not in result and "mean_nll_target" not in result
    stock = {(r["index"], r["completion_index"]): r
             for r in read_records(tmp_path / "scores.jsonl")}
    assert len(stock) == len(records)
    for record in records:
        other = stock[(record["index"], record["completion_index"])]
        assert other["sum_logp_theta"] == pytest.approx(record["sum_logp_theta"],
                                                        abs=SUM_TOLERANCE)
        assert not {"logp_theta", "completion_token_ids", "log_w", "sum_logp_target"} & set(other)


@pytest.mark.server
def test_resume_after_a_kill_writes_each_record_once(servers, scored, tmp_path):
    tmp, pairs, _, records = scored
    out = tmp_path / "out"
    out.mkdir()
    lines = (tmp / "out" / "scores.jsonl").read_bytes().splitlines(keepends=True)
    # what a kill leaves: some records, then half a line (the label prompt cut in two)
    (out / "scores.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][:40])
    result = score.run(make_config(servers, pairs, out, batch_size=4))
    again = list(read_records(out / "scores.jsonl"))
    keys = [(r["index"], r["completion_index"]) for r in again]
    assert len(keys) == len(set(keys)) == len(records)
    assert result["sequences_this_run"] == len(records) - 2
    first = {(r["index"], r["completion_index"]): r["sum_logp_target"] for r in records}
    for record in again:
        assert record["sum_logp_target"] == pytest.approx(
            first[(record["index"], record["completion_index"])], abs=SUM_TOLERANCE)


@pytest.mark.server
def test_a_long_shared_prompt_is_served_from_the_prefix_cache(servers, reference, tmp_path):
    """Label sets behind a prompt of more than two KV blocks (128 tokens each on CPU): the
    completions after the first read the prompt's blocks from the cache, same scores."""
    from dual_sampling.serving.launch import server_metrics
    from dual_sampling.models.tiny_models import corpus_path
    prompt = corpus_path().read_text(encoding="utf-8")[:900] + " Is that true? Answer:"
    pairs = write_pairs(tmp_path / "p.jsonl", [
        {"prompt": prompt, "completions": [" True", " False", " Not at all"]},
        {"prompt": prompt + " Well,", "completions": [" yes", " no"]}])
    url = servers.url("theta")
    hits_before = server_metrics(url, "vllm:prefix_cache_hits_total")[0]
    score.run(make_config(servers, pairs, tmp_path / "out", target=False))
    hits = server_metrics(url, "vllm:prefix_cache_hits_total")[0] - hits_before
    records = list(read_records(tmp_path / "out" / "scores.jsonl"))
    assert len(records) == 5
    prompt_lengths = {r["num_prompt_tokens"] for r in records}
    assert min(prompt_lengths) > 256
    assert all(p % 128 for p in prompt_lengths)  # a whole-block prompt would be scored again
    # two whole blocks for each completion after the first of its set (more when the
    # corpus's start is already cached, from this run's other set or an earlier test)
    assert hits >= 256 * 3
    for record in records:
        ids = record["prompt_token_ids"] + record["completion_token_ids"]
        p = record["num_prompt_tokens"]
        want = reference.full_logprobs("theta", ids)[np.arange(p - 1, len(ids) - 1),
                                                     record["completion_token_ids"]]
        assert record["sum_logp_theta"] == pytest.approx(want.sum(), abs=SUM_TOLERANCE)


def cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "dual_sampling", "mode=score", "progress=false",
            "wandb.mode=offline", *overrides]


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*overrides), cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.server
def test_sigkill_then_resume_scores_each_pair_exactly_once(servers, tmp_path):
    """A real kill of the real entry point mid-run, one pair a request so the run is slow."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", [
        {"prompt": f"Prompt {i} about the standard library", "completions": [" yes", " no"]}
        for i in range(300)])
    out = tmp_path / "out"
    args = (f"theta.url={servers.url('theta')}", f"target.url={servers.url('target')}",
            f"data.path={pairs}", f"output_dir={out}", "score.batch_size=2",
            "score.concurrency=1")
    proc = subprocess.Popen(cli(*args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    scores = out / "scores.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (
            scores.exists() and scores.read_bytes().count(b"\n") >= 40):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = scores.read_bytes().count(b"\n")
    assert 40 <= partial < 600
    with scores.open("ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"index": 299, "completion_index": 1, "prompt": "half')
    done = run_cli(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = [(r["index"], r["completion_index"]) for r in read_records(scores)]
    assert sorted(keys) == [(i, c) for i in range(300) for c in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_records"] == 600 and summary["sequences_this_run"] == 600 - partial


@pytest.mark.server
def test_hydra_run_with_shards_and_a_clear_error(servers, scored, tmp_path):
    _, pairs, _, _ = scored
    done = run_cli(tmp_path, f"theta.url={servers.url('theta')}",
                   f"target.url={servers.url('target')}", f"data.path={pairs}",
                   "data.num_shards=2", "data.shard_index=1", f"output_dir={tmp_path / 'o'}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = list(read_records(tmp_path / "o" / "scores.jsonl"))
    assert {r["index"] for r in records} == {1, 3}  # 5 is odd too, but too long: skipped
    assert "mean_nll_target" in done.stdout and (tmp_path / "o" / "wandb").is_dir()
    bad = write_pairs(tmp_path / "bad.jsonl", [BOUNDARY, {"prompt": "p", "completion": ""}])
    done = run_cli(tmp_path, f"theta.url={servers.url('theta')}", f"data.path={bad}",
                   f"output_dir={tmp_path / 'bad'}")
    assert done.returncode == 2 and "bad.jsonl:2: completion 0 is empty" in done.stderr
    assert not (tmp_path / "bad" / "scores.jsonl").exists()


@pytest.mark.server
def test_each_model_scores_the_completion_after_its_own_prompt(servers, reference, tmp_path):
    """A record with `target_prompt` (a teacher's hinted prompt): the target's logprobs are
    transformers' after that prompt, theta's after its own (within 1e-4, this pair's float32
    noise through a log-softmax), and the record keeps the target's prompt ids."""
    path = tmp_path / "hinted.jsonl"
    path.write_text(json.dumps({
        "prompt": "Question: name a module.\nAnswer:",
        "target_prompt": "Question: name a module.\n## Hint\nthe os module\nAnswer:",
        "completion": " the os module"}) + "\n")
    score.run(make_config(servers, path, tmp_path / "out", per_token=True))
    (record,) = read_records(tmp_path / "out" / "scores.jsonl")
    completion = record["completion_token_ids"]
    for model, prompt in (("theta", record["prompt_token_ids"]),
                          ("target", record["target_prompt_token_ids"])):
        full = reference.full_logprobs(model, prompt + completion)
        want = full[np.arange(len(prompt) - 1, len(prompt) + len(completion) - 1), completion]
        np.testing.assert_allclose(record[f"logp_{model}"], want, atol=1e-4)
    assert record["target_prompt_token_ids"] != record["prompt_token_ids"]
