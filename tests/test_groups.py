"""Groups (`sample.n`) and temperature (`sample.temperature`).

Pure: the per-(prompt, sample) streams, n = 1 and T = 1 against the loop as it was before
groups, independence from batching and group size, unfinished samples on failure, group
weights. Against the real servers: both transports token for token, a chi-square test of
the first token at T = 0.5 and T = 2 against the transformers reference, sample mode end to
end with groups, resume at sample granularity, and the report of the run.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
from scipy.stats import chisquare

from dual_sampling.core.coordinator import (Coordinator, PromptItem, SampleSettings,
                                               sequence_rng, sequence_seed)
from dual_sampling.core.transports.request import RequestTransport
from dual_sampling.files.records import read_records
from dual_sampling.maths import mixture
from dual_sampling.maths import groups
from helpers import (check_figures, check_table_row, read_page, run_sample, sample_cmd,
                     write_prompts)

VOCAB = 40


class FakeTransport:
    """Top-k of two made-up models: a deterministic function of each context."""

    def __init__(self) -> None:
        self.active: set[int] = set()

    def _topk(self, context: list[int], k: int, model: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([model, len(context), *context[-3:]])
        logp = np.log(rng.dirichlet(np.full(VOCAB, 0.3)))  # (V,)
        ids = np.argsort(-logp, kind="stable")[:k]
        return ids, logp[ids]

    async def step(self, keys, contexts, k):
        assert len(set(keys)) == len(keys), f"keys repeat in one step: {keys}"
        self.active |= set(keys)
        out = [np.array([self._topk(c, k, model)[part] for c in contexts])
               for model in (0, 1) for part in (0, 1)]
        return tuple(out)

    async def release(self, keys):
        assert set(keys) <= self.active
        self.active -= set(keys)

    async def aclose(self):
        return None


def settings(**overrides) -> SampleSettings:
    values = dict(top_k=5, max_tokens=6, alpha=None, missing="kth", concurrency=3,
                  eos_token_ids=(0,), max_model_len=100, seed=7)
    return SampleSettings(**{**values, **overrides})


async def prompt_items(items):
    for item in items:
        yield item


def run_fake(s: SampleSettings, n: int, prompts=((1, 2), (3,), (4, 5, 6), (7,)),
             on_finished=None, transport=None) -> dict[tuple[int, int], list[int]]:
    finished = {}

    async def keep(seq) -> None:
        finished[seq.item.index, seq.sample_index] = seq.completion_ids
        if on_finished is not None:
            await on_finished(seq)

    items = [PromptItem(i, "", list(ids), tuple(range(n))) for i, ids in enumerate(prompts)]
    asyncio.run(Coordinator(transport or FakeTransport(), s, keep).run(prompt_items(items)))
    return finished


def legacy_tokens(s: SampleSettings, index: int, prompt: list[int]) -> list[int]:
    """The loop before groups and temperature: PCG64([seed, index]), sampling from q*."""
    fake, rng, out = FakeTransport(), np.random.Generator(np.random.PCG64([s.seed, index])), []
    while True:
        topk = [fake._topk(prompt + out, s.top_k, model) for model in (0, 1)]
        cand = mixture.merge_topk(*(part[None] for pair in topk for part in pair))
        log_q = mixture.log_mixture(cand.logp_theta, cand.logp_target,
                                    mixture.solve_alpha(cand.logp_theta, cand.logp_target))
        out.append(int(cand.ids[0, mixture.inverse_cdf(log_q, np.array([rng.random()]))[0]]))
        if out[-1] in s.eos_token_ids or len(out) >= s.max_tokens:
            return out


def test_sample_zero_keeps_the_stream_of_datasets_before_groups():
    for seed, index in ((0, 0), (3, 17), (2 ** 40, 2 ** 35)):
        legacy = np.random.Generator(np.random.PCG64([seed, index])).random(5)
        np.testing.assert_array_equal(sequence_rng(seed, index, 0).random(5), legacy)
        others = [sequence_rng(seed, index, s).random(5) for s in (1, 2)]
        assert not any(np.array_equal(o, legacy) for o in others)
        assert not np.array_equal(*others)
    assert sequence_seed(3, 17, 0) == [3, 17] and sequence_seed(3, 17, 2) == [3, 17, 2]


def test_n1_t1_reproduces_the_loop_before_groups_token_for_token():
    s = settings()
    got = run_fake(s, n=1)
    prompts = ((1, 2), (3,), (4, 5, 6), (7,))
    assert got == {(i, 0): legacy_tokens(s, i, list(p)) for i, p in enumerate(prompts)}


def test_tokens_do_not_depend_on_batching_or_group_size():
    base = run_fake(settings(concurrency=1, temperature=0.7), n=3)
    assert sorted(base) == [(i, s) for i in range(4) for s in range(3)]
    assert run_fake(settings(concurrency=5, temperature=0.7), n=3) == base
    two = run_fake(settings(concurrency=2, temperature=0.7), n=2)
    assert two == {key: tokens for key, tokens in base.items() if key[1] < 2}
    assert len({tuple(base[0, s]) for s in range(3)}) > 1, "samples of a group should differ"


def test_a_failed_writer_gives_back_only_the_unwritten_samples():
    written = []

    async def fail_on_third(seq) -> None:
        if len(written) == 2:
            raise OSError("disk full")
        written.append((seq.item.index, seq.sample_index))

    s = settings(concurrency=2)
    coordinator = Coordinator(FakeTransport(), s, fail_on_third)
    items = [PromptItem(i, "", [i + 1], (0, 1, 2)) for i in range(3)]
    with pytest.raises(OSError):
        asyncio.run(coordinator.run(prompt_items(items)))
    left = [(item.index, s) for item in coordinator.unfinished for s in item.sample_indices]
    assert len(left) == len(set(left)) and not set(left) & set(written)
    taken = set(written) | set(left)
    assert all(item.sample_indices == (s,) for item in coordinator.unfinished for s in
               item.sample_indices)
    assert {(0, 0), (0, 1), (0, 2)} <= taken  # a whole group was taken, none of it doubled


def test_group_weights_are_the_softmax_of_each_complete_group():
    records = [{"index": i, "sample_index": s, "log_w_theta": lw,
                "log_w_target": None if lw is None else -lw}
               for i, s, lw in ((0, 0, 0.0), (0, 1, np.log(3.0)), (1, 1, 0.5), (2, 0, -1.0),
                                (2, 1, None), (1, 2, 0.1))]
    rows = groups.group_weights(records, 2)
    assert [r["index"] for r in rows] == [0, 2]  # prompt 1 lacks sample 0
    np.testing.assert_allclose(rows[0]["weight_theta"], [0.25, 0.75])
    np.testing.assert_allclose(rows[0]["ess_theta"], 1 / (0.25 ** 2 + 0.75 ** 2))
    assert rows[1]["weight_theta"] == [1.0, 0.0] and rows[1]["log_w_theta"] == [-1.0, None]
    assert rows[1]["ess_theta_fraction"] == 0.5
    summary = groups.summarize_groups(rows)
    assert summary["groups_complete"] == 2
    assert summary["mean_group_ess_theta_fraction"] == pytest.approx(
        (rows[0]["ess_theta"] / 2 + 0.5) / 2)
    assert groups.group_weights(records[:1], 2) == []


# -- against real servers ---------------------------------------------------------------------
def server_clients(servers):
    from dual_sampling.clients.client import VLLMClient
    return (VLLMClient(servers.url("theta"), name="theta"),
            VLLMClient(servers.url("target"), name="target"))


async def _coordinate(servers, transport_name: str, s: SampleSettings,
                      items: list[PromptItem]) -> dict:
    from dual_sampling.core.transports.session import SessionTransport
    theta, target = server_clients(servers)
    finished = {}

    async def keep(seq) -> None:
        finished[seq.item.index, seq.sample_index] = seq

    async with theta, target:
        transport = (SessionTransport(theta, target) if transport_name == "session"
                     else RequestTransport(theta, target))
        try:
            await Coordinator(transport, s, keep).run(prompt_items(items))
        finally:
            await transport.aclose()
    return finished


@pytest.mark.server
def test_transports_agree_with_groups_and_temperature(servers, tiny_models):
    from dual_sampling.models.reference import Reference
    ids = Reference(tiny_models).tokenizer("The river ran slowly past the mill and")["input_ids"]
    items = [PromptItem(i, "", ids[: 4 + i], (0, 1, 2)) for i in range(3)]
    s = settings(top_k=20, max_tokens=10, concurrency=4, eos_token_ids=(), temperature=2.0)
    by = {name: asyncio.run(_coordinate(servers, name, s, items))
          for name in ("request", "session")}
    assert sorted(by["request"]) == sorted(by["session"]) == [
        (i, k) for i in range(3) for k in range(3)]
    for key, seq in by["request"].items():
        assert by["session"][key].completion_ids == seq.completion_ids, key
    # sample 0 of a group is the n = 1 sequence
    single = asyncio.run(_coordinate(servers, "request", s, [
        PromptItem(i, "", ids[: 4 + i]) for i in range(3)]))
    assert all(single[i, 0].completion_ids == by["request"][i, 0].completion_ids
               for i in range(3))


@pytest.mark.server
@pytest.mark.parametrize("transport, temperature", [("request", 0.5), ("session", 2.0)])
def test_first_token_frequencies_match_the_tempered_reference(servers, tiny_models,
                                                              transport, temperature):
    """400 samples of one prompt, one token each: chi-square against q*^(1/T) computed by
    transformers from each model's top-20 (what the servers return), merged as sample mode
    merges them; and logp_q / logp_theta of every draw against the same."""
    from dual_sampling.models.reference import Reference
    ref = Reference(tiny_models)
    prompt = ref.tokenizer("The river ran slowly past the")["input_ids"]
    n = 400
    s = settings(top_k=20, max_tokens=1, concurrency=64, eos_token_ids=(),
                 temperature=temperature)
    finished = asyncio.run(_coordinate(servers, transport, s,
                                       [PromptItem(0, "", prompt, tuple(range(n)))]))
    logp_theta, logp_target = ref.position_logprobs(prompt)  # (V,) each
    ids_theta, ids_target = (np.argsort(-lp, kind="stable")[:20] for lp in (logp_theta, logp_target))
    cand = mixture.merge_topk(ids_theta[None], logp_theta[ids_theta][None],
                              ids_target[None], logp_target[ids_target][None])
    alpha = mixture.solve_alpha(cand.logp_theta, cand.logp_target)
    log_q = mixture.temper(mixture.log_mixture(cand.logp_theta, cand.logp_target, alpha),
                           temperature)[0]  # (M,)
    position = {int(token): m for m, token in enumerate(cand.ids[0]) if token >= 0}
    counts = np.zeros(len(log_q))
    for seq in finished.values():
        token = seq.completion_ids[0]
        counts[position[token]] += 1
        assert seq.tokens["logp_q"][0] == pytest.approx(log_q[position[token]], abs=2e-3)
        # untempered: the model's logprob (its k-th when outside its top-k, missing=kth)
        assert seq.tokens["logp_theta"][0] == pytest.approx(
            cand.logp_theta[0, position[token]], abs=2e-3)
    expected = np.exp(log_q) * n
    big = expected >= 5  # pool the rare candidates into one bin
    observed = np.r_[counts[big], counts[~big].sum()]
    wanted = np.r_[expected[big], expected[~big].sum()]
    keep = wanted > 0
    assert big.sum() >= 3, "the test needs a few likely candidates"
    assert chisquare(observed[keep], wanted[keep] * observed.sum() / wanted[keep].sum()
                     ).pvalue > 1e-3


@pytest.fixture(scope="module")
def group_run(servers, tmp_path_factory):
    """A sample run with groups of 3 at T = 0.5, candidates recorded, and its report."""
    tmp = tmp_path_factory.mktemp("groups")
    prompts = write_prompts(tmp / "prompts.jsonl", [f"Prompt {i}: the module" for i in range(4)])
    args = ("sample.n=3", "sample.temperature=0.5", "sample.max_tokens=8",
            "sample.record_candidates=true", "sample.top_k=20")
    out = tmp / "out"
    run_sample(servers, prompts, out, *args)
    return out, prompts, args


@pytest.mark.server
def test_group_dataset_records_groups_file_and_summary(group_run):
    out, _, _ = group_run
    records = list(read_records(out / "samples.jsonl"))
    assert sorted((r["index"], r["sample_index"]) for r in records) == [
        (i, s) for i in range(4) for s in range(3)]
    for r in records:
        assert r["temperature"] == 0.5
        for t, cand in enumerate(r["candidates"]):
            merged = mixture.merge_topk(*(np.array([cand[f"{part}_{model}"]], dtype=dtype)
                                          for model in ("theta", "target")
                                          for part, dtype in (("ids", int), ("logp", float))))
            log_q = mixture.temper(mixture.log_mixture(
                merged.logp_theta, merged.logp_target, r["alpha"][t]), 0.5)[0]
            m = list(merged.ids[0]).index(r["completion_token_ids"][t])
            assert r["logp_q"][t] == pytest.approx(log_q[m], abs=1e-9)
            assert r["logp_theta"][t] == pytest.approx(merged.logp_theta[0, m], abs=1e-9)
    rows = list(read_records(out / "groups.jsonl"))
    assert rows == groups.group_weights(records, 3) and len(rows) == 4
    for row in rows:
        assert sum(row["weight_theta"]) == pytest.approx(1.0)
        assert 1.0 <= row["ess_target"] <= 3.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["temperature"] == 0.5
    assert summary["groups_complete"] == 4 and summary["num_prompts"] == 4
    assert 1 / 3 <= summary["mean_group_ess_theta_fraction"] <= 1
    blob = b"".join(f.read_bytes() for f in out.rglob("run-*.wandb"))
    assert b"report/alpha_histogram" in blob and b"report/log_weights_ess" in blob  # W&B images


@pytest.mark.server
def test_resume_completes_half_groups_without_doubling(servers, group_run, tmp_path):
    out, prompts, args = group_run
    full = {(r["index"], r["sample_index"]): r["completion_token_ids"]
            for r in read_records(out / "samples.jsonl")}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    lines = (out / "samples.jsonl").read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if (json.loads(line)["index"] + json.loads(line)[
        "sample_index"]) % 2 == 0]  # every group left incomplete, some whole samples kept
    (resumed / "samples.jsonl").write_bytes(b"".join(kept) + lines[-1][:40])
    run_sample(servers, prompts, resumed, *args)
    again = [(r["index"], r["sample_index"]) for r in read_records(resumed / "samples.jsonl")]
    assert sorted(again) == sorted(full) and len(again) == len(set(again))
    assert {(r["index"], r["sample_index"]): r["completion_token_ids"]
            for r in read_records(resumed / "samples.jsonl")} == full
    assert list(read_records(resumed / "groups.jsonl")) == list(read_records(out / "groups.jsonl"))


@pytest.mark.server
def test_report_of_the_run_holds_its_summary(group_run):
    out, _, _ = group_run
    page = read_page(out)
    check_figures(out, page, at_least=6)
    assert len(page.rows) == 1
    summary = json.loads((out / "summary.json").read_text())
    check_table_row(page.rows[0], summary)
    assert float(page.rows[0]["mean_group_ess_theta_fraction"]) == pytest.approx(
        summary["mean_group_ess_theta_fraction"], rel=1e-3)


@pytest.mark.server
def test_report_of_a_two_job_sweep(servers, tmp_path):
    import subprocess
    import sys
    prompts = write_prompts(tmp_path / "p.jsonl", ["Prompt A: the module", "Prompt B: a list"])
    out = tmp_path / "sweep"
    done = subprocess.run(sample_cmd(servers, prompts, out, "sample.max_tokens=4", "sample.n=2",
                                     "sample.top_k=5,20", f"hydra.sweep.dir={tmp_path / 'hydra'}",
                                     multirun=True), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "dual_sampling.report", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    page = read_page(out)
    check_figures(out, page, at_least=7)
    assert [row["sample.top_k"] for row in page.rows] == ["5", "20"]
    for job, row in enumerate(page.rows):
        check_table_row(row, json.loads((out / f"job{job}" / "summary.json").read_text()))
        assert (out / f"job{job}" / "report.html").exists()  # each run's own report
    shutil.rmtree(out / "job1")
    (out / "job1").mkdir()
    (out / "job1" / "overrides.yaml").write_text("- mode=topk\n")
    done = subprocess.run([sys.executable, "-m", "dual_sampling.report", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "job1" in (out / "report.html").read_text()
    assert len(read_page(out).rows) == 1
