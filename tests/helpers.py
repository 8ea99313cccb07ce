"""Helpers shared by the test modules, in one place (no test module imports another): the
independent references (scipy's Chernoff point, chi-square), the fused route, sample-mode
runs through the real entry point and their dataset checks, the coordinator on the session
pair, the report page, the real pair's chats and tolerances. Fixtures live in conftest.py."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import chisquare

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.coordinator import Coordinator, PromptItem, SampleSettings
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.files.records import read_records
from dual_sampling.maths import mixture
from dual_sampling.models.tiny_models import corpus_path
from dual_sampling.serving.launch import Servers
from dual_sampling.wire.fused_format import GENERATE_PATH as FUSED_PATH




# -- independent references -------------------------------------------------------------


def chernoff_alpha(logp_theta: np.ndarray, logp_target: np.ndarray) -> float:
    """The full-vocabulary Chernoff point by scipy's bounded scalar minimiser of log Z."""
    return minimize_scalar(lambda x: logsumexp((1 - x) * logp_theta + x * logp_target),
                           bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).x


def chi_square_p(tokens: list[int], q: np.ndarray) -> float:
    """p-value of the tokens' counts against q (bins with expected count < 5 pooled)."""
    counts = np.bincount(tokens, minlength=len(q)).astype(float)
    expected = q * len(tokens)
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    return chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue


def assert_rule_alpha(got: float, a: np.ndarray, b: np.ndarray, rule: dict) -> None:
    """An engine's alpha for one token against mixture.choose_alpha on transformers'
    full-vocabulary logprobs a, b (checked against scipy in test_mixture.py), within the
    forward noise: an engine's logprobs differ from transformers' by ~1e-6, which moves
    entropy's ratio by ~1e-6 (1e-5 here) and ess_balance's condition h by a few 1e-6, so
    its root by that over |h'| (flat where the two tilts agree): there the engine's alpha
    must zero transformers' h to 1e-4 instead."""
    want = mixture.choose_alpha(a, b, rule["alpha_method"], alpha_min=rule.get("alpha_min", 0.0),
                                alpha_max=rule.get("alpha_max", 1.0))
    if rule["alpha_method"] == "ess_balance" and abs(got - want) >= 1e-5:
        lq = (1 - got) * a + got * b
        lq -= np.logaddexp.reduce(lq)
        gap = np.logaddexp.reduce(2 * a - lq) - np.logaddexp.reduce(2 * b - lq)
        assert abs(gap) < 1e-4, (got, want, gap)
    else:
        assert abs(got - want) < 1e-5, (got, want)

# -- the fused route ------------------------------------------------------------------------


def generate(server: Servers, prompts: list[list[int]], seeds: list[int], max_tokens: int,
             **options) -> list[dict]:
    body = json.dumps({"prompts": prompts, "seeds": seeds, "max_tokens": max_tokens, **options})
    request = urllib.request.Request(server.url("fused") + FUSED_PATH, body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())["results"]


def encode(reference, text: str) -> list[int]:
    return reference.tokenizer(text)["input_ids"]


def assert_batch_invariant_and_greedy_is_the_argmax(server: Servers, reference,
                                                     prompts: list[list[int]],
                                                     greedy_tokens: int) -> None:
    """A fused server's tokens at one seed: the same alone, again and in a batch of 12; at
    T = 0 each is the argmax of q* (scipy's alpha*) on transformers' logprobs."""
    alone = generate(server, prompts[:1], [7], max_tokens=24)[0]
    again = generate(server, prompts[:1], [7], max_tokens=24)[0]
    batched = generate(server, prompts, [7] + list(range(100, 100 + len(prompts) - 1)),
                       max_tokens=24)[0]
    assert alone["token_ids"] == again["token_ids"] == batched["token_ids"]
    np.testing.assert_allclose(alone["alpha"], batched["alpha"], atol=1e-6)
    greedy = generate(server, prompts[:1], [7], max_tokens=greedy_tokens, temperature=0.0)[0]
    assert greedy["logp_q"] == [0.0] * greedy_tokens
    ids = prompts[0] + greedy["token_ids"]
    full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
    for t, token in enumerate(greedy["token_ids"]):
        a, b = (f[len(prompts[0]) - 1 + t] for f in full)
        assert token == int(np.argmax(mixture.log_mixture(a, b, chernoff_alpha(a, b))))
# -- sample mode through the real entry point ------------------------------------------------


PROMPTS = [f"Prompt number {i}: the standard library module" for i in range(24)]


FIELDS_PER_TOKEN = ("alpha", "logp_theta", "logp_target", "logp_q", "kl_q_theta",
                    "kl_q_target", "coverage_theta", "coverage_target")


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def sample_cmd(servers: Servers, prompts: Path, out: Path, *overrides: str,
               multirun: bool = False) -> list[str]:
    """`python -m dual_sampling mode=sample` on a fused server (its `fused` role: 16 tokens) or
    on the theta/target pair (12 tokens)."""
    if "fused" in servers.ports:
        urls = [f"theta.url={servers.url('fused')}", "sample.max_tokens=16"]
    else:
        urls = [f"theta.url={servers.url('theta')}", f"target.url={servers.url('target')}",
                "sample.max_tokens=12"]
    return [sys.executable, "-m", "dual_sampling", *(["-m"] if multirun else []), "mode=sample",
            *urls, f"data.prompts={prompts}", f"output_dir={out}", "progress=false",
            "sample.concurrency=8", "wandb.mode=offline", *overrides]


def run_sample(servers, prompts: Path, out: Path, *overrides: str, check: bool = True):
    done = subprocess.run(sample_cmd(servers, prompts, out, *overrides), capture_output=True,
                          text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"sample run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def wait_for_records(proc: subprocess.Popen, samples: Path, n: int,
                     timeout_s: float = 300) -> None:
    """Return once `samples` holds n complete lines (or the process ended, or time ran out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)


def run_killing_a_replica(cmd: list[str], replica: Servers, role: str, out: Path) -> None:
    """Run a sample command whose theta.url lists `replica`'s `role` among others; SIGKILL
    that replica once two records are written; the run must finish, restarting the
    replica's sequences on the others."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(proc, out / "samples.jsonl", 2)
        replica.kill(role)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        replica.stop()
    assert proc.returncode == 0, stderr[-3000:]
    assert "restart on the others" in stdout + stderr

def tokens_of(out: Path) -> dict[int, list[int]]:
    return {r["index"]: r["completion_token_ids"] for r in read_records(out / "samples.jsonl")}


def check_dataset(out: Path, n_prompts: int, exact: bool = False) -> list[dict]:
    """Every prompt once, each record's per-token fields as long as its completion and its
    sums consistent; `exact` (a fused or exact run): every token in both models' rows."""
    records = list(read_records(out / "samples.jsonl"))
    assert sorted(r["index"] for r in records) == list(range(n_prompts))
    for r in records:
        n = len(r["completion_token_ids"])
        assert n == r["num_tokens"] >= 1
        assert all(len(r[f]) == n for f in FIELDS_PER_TOKEN)
        assert all(0.0 <= a <= 1.0 for a in r["alpha"])
        assert r["finish_reason"] in ("stop", "length")
        if exact:
            assert len(r["entropy_q"]) == len(r["in_topk_target"]) == n
            assert set(r["coverage_theta"]) == {1.0} and set(r["in_topk_target"]) == {True}
        assert r["sum_logp_q"] == pytest.approx(sum(r["logp_q"]))
        assert r["log_w_theta"] == pytest.approx(r["sum_logp_theta"] - r["sum_logp_q"])
    return records

# -- the coordinator on the session pair -----------------------------------------------------


# Different prompt lengths under a small coordinator max_model_len make sequences finish at
# different steps, so refilled slots put OPEN and STEP messages in the same step.
PROMPT_LENGTHS = (12, 20, 28, 36, 16, 24)


def settings(concurrency: int, max_tokens: int, max_model_len: int) -> SampleSettings:
    """As experiments/bench_sample.py's dual_tok_s: top-20, alpha*, missing=kth, no EOS."""
    return SampleSettings(top_k=20, max_tokens=max_tokens, alpha=None, missing="kth",
                          concurrency=concurrency, eos_token_ids=(),
                          max_model_len=max_model_len, seed=3)


async def prompt_items(prompts: list[list[int]]):
    for index, ids in enumerate(prompts):
        yield PromptItem(index, "", ids)


async def run_coordinator(transport, prompts: list[list[int]], s: SampleSettings) -> dict:
    finished = {}

    async def keep(seq) -> None:
        finished[seq.item.index] = seq
    await Coordinator(transport, s, keep).run(prompt_items(prompts))
    return finished


async def corpus_prompts(client: VLLMClient, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    ids = await client.tokenize(corpus_path().read_text()[:8000])
    return [ids[7 * i: 7 * i + length] for i, length in enumerate(lengths)]


def clients(servers) -> tuple[VLLMClient, VLLMClient]:
    return (VLLMClient(servers.url("theta"), name="theta"),
            VLLMClient(servers.url("target"), name="target"))


def topk_of(url: str, sequences, k=32, fmt="int8"):
    async def go():
        async with VLLMClient(url, name="teacher") as client:
            return await client.prompt_topk(sequences, k, fmt)
    return asyncio.run(go())


async def run_exact(theta_url: str, target_url: str, items: list[PromptItem], *, seed: int,
                    max_tokens: int, vocab_size: int | None = None, max_model_len: int = 2048,
                    concurrency: int = 32, **options) -> tuple[dict, int]:
    """(index, sample_index) -> Sequence through the exact session transport (top_k unset,
    no EOS; `options`: alpha, temperature, the alpha rule), and the bytes the target's
    connection received."""
    done = {}

    async def on_finished(seq) -> None:
        done[seq.item.index, seq.sample_index] = seq

    async def feed():
        for item in items:
            yield item

    settings = SampleSettings(top_k=None, max_tokens=max_tokens, missing="kth",
                              concurrency=concurrency, eos_token_ids=(),
                              max_model_len=max_model_len, vocab_size=vocab_size, seed=seed,
                              **{"alpha": None, **options})
    async with VLLMClient(theta_url, name="theta") as theta, \
            VLLMClient(target_url, name="target") as target:
        transport = SessionTransport(theta, target)
        try:
            await Coordinator(transport, settings, on_finished).run(feed())
            received = transport.target.bytes_received
        finally:
            await transport.aclose()
    return done, received


def exact_sequences(theta_url: str, target_url: str, prompts: list[list[int]],
                    **options) -> list:
    """One exact-path Sequence per prompt, in order (run_exact's options)."""
    items = [PromptItem(i, "", ids) for i, ids in enumerate(prompts)]
    done, _ = asyncio.run(run_exact(theta_url, target_url, items, **options))
    return [done[i, 0] for i in range(len(prompts))]

# -- the report page ------------------------------------------------------------------------


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """The summary table's cells by `data-key`, the image sources, the skipped jobs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.images: list[str] = []
        self._key = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append({})
        elif tag == "td":
            self._key = attrs.get("data-key")
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._key is not None:
            self.rows[-1][self._key] = self.rows[-1].get(self._key, "") + data

    def handle_endtag(self, tag):
        if tag == "td":
            self._key = None


def read_page(out: Path) -> _Page:
    page = _Page((out / "report.html").read_text())
    page.rows = [row for row in page.rows if row]  # the header row has no data cells
    return page


def check_figures(out: Path, page: _Page, at_least: int = 6) -> None:
    assert len(page.images) >= at_least
    for src in page.images:
        data = (out / src).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, src


def check_table_row(row: dict[str, str], summary: dict) -> None:
    for key in ("num_sequences", "num_tokens", "mean_alpha", "mean_kl_q_theta",
                "ess_theta_fraction", "ess_target_fraction", "tokens_per_s"):
        assert float(row[key]) == pytest.approx(summary[key], rel=1e-3), key

# -- the real pair ----------------------------------------------------------------------------


LOGP_TOL = 2e-4  # twice the largest float32 noise seen: test_real_fused.py's docstring


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Give me two tips for staying focused."}],
]


def chat_ids(real_reference, messages) -> list[int]:
    return real_reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)


def alpha_bound(a: np.ndarray, b: np.ndarray, alpha: float) -> float:
    q = np.exp(mixture.log_mixture(a, b, alpha))
    d = b - a
    return max(1e-5, LOGP_TOL / (q @ (d * d) - (q @ d) ** 2))
