"""The exact two-engine transport (session, `top_k` unset) against real vLLM CPU servers.

Each server sends its model's logits over the whole vocabulary every step
(vllm_plugin/full_logits.py); the coordinator samples q* with the fused engine's kernels
and its counter-based uniforms. So, at one seed, it must emit the fused engine's tokens
(`servers` pair against `fused_server`: the same tiny weights, the fused target padded),
every per-token field must match transformers + scipy over the full vocabulary, and first
tokens must follow q* (chi-square).
"""
from __future__ import annotations

import asyncio
import json
import urllib.request

import numpy as np
import pytest
from scipy.stats import chisquare

from dual_sampling.clients.client import ServerInfo, VLLMClient
from dual_sampling.config import SampleParams
from dual_sampling.core.coordinator import Coordinator, PromptItem, SampleSettings, prompt_seed
from dual_sampling.core.sampling import choose_exact
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.errors import ConfigError, ServerMismatchError
from dual_sampling.maths import mixture
from dual_sampling.wire import session_format as wire
from dual_sampling.wire.fused_format import GENERATE_PATH as FUSED_PATH
from helpers import assert_rule_alpha, chernoff_alpha, encode, exact_sequences, run_exact

VOCAB = 1024  # the tiny tokenizer's ids
TEXTS = [f"Prompt number {i}: the standard library module" for i in range(8)]


@pytest.fixture(scope="module")
def reference(tiny_models):
    from dual_sampling.models.reference import Reference
    return Reference(tiny_models)


def exact(servers, prompts: list[list[int]], seed: int, max_tokens: int, **options) -> list:
    return exact_sequences(servers.url("theta"), servers.url("target"), prompts, seed=seed,
                           max_tokens=max_tokens, vocab_size=VOCAB, **options)


def fused(server, prompts: list[list[int]], seed: int, max_tokens: int, **options) -> list:
    body = {"prompts": prompts, "seeds": [prompt_seed(seed, i) for i in range(len(prompts))],
            "max_tokens": max_tokens, "ignore_eos": True, **options}
    request = urllib.request.Request(server.url("fused") + FUSED_PATH,
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())["results"]


# -- the same tokens as the fused engine ------------------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("alpha,temperature", [(None, 1.0), (None, 0.7), (0.3, 1.0)])
def test_same_seed_same_tokens_as_the_fused_engine(servers, fused_server, reference, alpha,
                                                   temperature):
    """Token for token on every sequence. Both sides run the same kernels on logits that
    differ by float32 rounding only (the fused engine batches both models in one engine:
    other matmul shapes, ~1e-6 here), so a token could differ only where a uniform falls
    within ~1e-6 of a CDF boundary: with 8 x 24 draws, an expected count of ~1e-3."""
    prompts = [encode(reference, text) for text in TEXTS]
    options = {"alpha": alpha, "temperature": temperature}
    two = exact(servers, prompts, seed=5, max_tokens=24, **options)
    one = fused(fused_server, prompts, seed=5, max_tokens=24, **options)
    differ = sum(a.completion_ids != b["token_ids"] for a, b in zip(two, one))
    assert differ == 0, [(a.completion_ids, b["token_ids"]) for a, b in zip(two, one)]
    for a, b in zip(two, one):
        for name in ("alpha", "logp_theta", "logp_target", "logp_q", "kl_q_theta",
                     "kl_q_target", "entropy_q"):
            # two engines' float32 logits of one model differ by ~1e-6 (batch shapes)
            np.testing.assert_allclose(a.tokens[name], b[name], atol=2e-5, err_msg=name)


# -- every field against transformers and scipy -----------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("alpha,temperature", [(None, 1.0), (None, 0.7), (0.3, 1.0)])
def test_every_token_matches_the_full_vocabulary_reference(servers, reference, alpha,
                                                           temperature):
    """alpha* within 1e-5 of scipy's Chernoff point on transformers' logprobs, or what
    float32 forward noise allows (engine vs transformers logprobs differ by ~1e-6 on this
    2-layer model, moving g by ~2e-6 and alpha* by that over Var_q[d]); the logprobs, KLs and
    entropy within 1e-4 (the same noise through a few sums); logp_q is log q*^(1/T)."""
    prompts = [encode(reference, text) for text in TEXTS[:3]]
    checked = 0
    for prompt, seq in zip(prompts, exact(servers, prompts, seed=9, max_tokens=16,
                                          alpha=alpha, temperature=temperature)):
        ids = prompt + seq.completion_ids
        full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t, token in enumerate(seq.completion_ids):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            solved = chernoff_alpha(a, b) if alpha is None else alpha
            log_q = mixture.log_mixture(a, b, solved)
            q, d = np.exp(log_q), b - a
            var = q @ (d * d) - (q @ d) ** 2
            assert abs(seq.tokens["alpha"][t] - solved) <= max(1e-5, 2e-6 / var)
            tempered = mixture.temper(log_q, temperature)
            diag = mixture.token_diagnostics(a, b, log_q)
            np.testing.assert_allclose(
                [seq.tokens[f][t] for f in ("logp_theta", "logp_target", "logp_q",
                                            "kl_q_theta", "kl_q_target", "entropy_q")],
                [a[token], b[token], tempered[token], diag["kl_q_theta"],
                 diag["kl_q_target"], diag["entropy_q"]], atol=1e-4)
            assert seq.tokens["coverage_theta"][t] == 1.0 and seq.tokens["in_topk_target"][t]
            checked += 1
    assert checked == 48


@pytest.mark.server
def test_first_tokens_follow_q_star(servers, reference):
    """2,000 samples of one prompt (their own seeds): chi-square against the full q*."""
    prompt = encode(reference, "The module")
    n = 2000
    items = [PromptItem(0, "", prompt, tuple(range(n)))]
    done, _ = asyncio.run(run_exact(servers.url("theta"), servers.url("target"), items, seed=3,
                                    max_tokens=1, concurrency=120, vocab_size=VOCAB))
    tokens = [done[0, s].completion_ids[0] for s in range(n)]
    a, b = reference.position_logprobs(prompt)
    q = np.exp(mixture.log_mixture(a, b, chernoff_alpha(a, b)))
    counts = np.bincount(tokens, minlength=len(q)).astype(float)
    expected = q * n
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    assert chisquare(observed, wanted * n / wanted.sum()).pvalue > 1e-3


# -- the wire and the choice of path ----------------------------------------------------------
def test_full_reply_round_trip():
    rows = np.arange(6, dtype="<f4").reshape(2, 3)
    frame = wire.encode_full(wire.STEP, 4, rows.tobytes(), 2, 3, "float32")
    assert wire.is_full(frame)
    op, msg_id, payload, n, width, dtype = wire.decode_full(frame)
    assert (op, msg_id, n, width, dtype) == (wire.STEP, 4, 2, 3, "float32")
    np.testing.assert_array_equal(np.frombuffer(payload, "<f4").reshape(2, 3), rows)
    with pytest.raises(wire.SessionFormatError, match="bytes"):
        wire.decode_full(frame[:-4])


def _info(full_logits: bool) -> ServerInfo:
    return ServerInfo(url="http://x", model="m", max_model_len=64, bos_token_id=None,
                      eos_token_ids=(), vocab_size=VOCAB, has_plugin=True,
                      full_logits=full_logits)


def test_which_path_a_session_run_takes():
    both = [_info(True), _info(True)]
    assert choose_exact(SampleParams(transport="session"), both)
    assert choose_exact(SampleParams(transport="auto"), both)
    assert not choose_exact(SampleParams(transport="session", top_k=20), both)
    # auto falls back to the merged top-k; session with top_k unset insists on exact
    assert not choose_exact(SampleParams(transport="auto"), [_info(True), _info(False)])
    with pytest.raises(ServerMismatchError, match="start_vllm.sh"):
        choose_exact(SampleParams(transport="session"), [_info(True), _info(False)])
    with pytest.raises(ConfigError, match="record_candidates"):
        choose_exact(SampleParams(transport="session", record_candidates=True), both)


# -- sample mode end to end -------------------------------------------------------------------
@pytest.mark.server
def test_sample_mode_records_the_exact_path_and_a_killed_run_resumes_to_the_same_dataset(
        servers, tmp_path):
    """The CLI on two plugin servers with top_k unset: exact (summary, run_params, coverage
    1); a run killed mid-way and resumed gives the uninterrupted run's dataset token for
    token; a resume that asks for the merged top-k instead is refused."""
    import signal
    import subprocess
    import sys
    import time

    from dual_sampling.files.records import read_records
    texts = [f"Prompt {i}: the standard library module" for i in range(12)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    def cmd(out, *overrides):
        return [sys.executable, "-m", "dual_sampling", "mode=sample",
                f"theta.url={servers.url('theta')}", f"target.url={servers.url('target')}",
                f"data.prompts={prompts}", f"output_dir={out}", "progress=false",
                "sample.transport=session", "sample.max_tokens=16", "sample.concurrency=2",
                "sample.report=false", "wandb.mode=disabled", *overrides]

    whole = tmp_path / "whole"
    subprocess.run(cmd(whole), check=True, capture_output=True, timeout=600)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["exact"] is True and summary["top_k"] is None
    assert summary["transport"] == "session" and summary["mean_coverage_theta"] == 1.0
    assert json.loads((whole / "run_params.json").read_text())["exact"] is True

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = killed / "samples.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
            samples.exists() and samples.read_bytes().count(b"\n") >= 3):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    refused = subprocess.run(cmd(killed, "sample.top_k=20"), capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "exact q* there" in refused.stderr
    subprocess.run(cmd(killed), check=True, capture_output=True, timeout=600)

    def tokens(out):
        return {r["index"]: r["completion_token_ids"] for r in read_records(out / "samples.jsonl")}

    assert len(tokens(killed)) == len(texts)
    assert tokens(killed) == tokens(whole)


# -- two engines of different settings --------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_target(tiny_models, tmp_path_factory):
    """The tiny target served in bfloat16 with a shorter max length (theta stays float32)."""
    from dual_sampling.serving.launch import Servers
    server = Servers(run_dir=tmp_path_factory.mktemp("vllm_bf16"),
                     models={"target": tiny_models["target"]},
                     extra=("--dtype", "bfloat16", "--max-model-len", "512"))
    server.start("target")
    yield server
    server.stop()


@pytest.mark.server
def test_engines_of_two_dtypes_and_max_lengths(servers, bf16_target, reference):
    """theta in float32, the target in bfloat16: the target's rows travel as bfloat16 (2
    bytes an id), and its logprobs match transformers within bfloat16's rounding of logits
    of this size (|logit| < 16: half a unit in the last place, 2^-8 * 16 / 2 = 0.03)."""
    prompts = [encode(reference, text) for text in TEXTS[:2]]

    items = [PromptItem(i, "", ids) for i, ids in enumerate(prompts)]
    done, received = asyncio.run(run_exact(servers.url("theta"), bf16_target.url("target"),
                                           items, seed=1, max_tokens=8, concurrency=2,
                                           max_model_len=512, vocab_size=VOCAB))
    sequences = [done[i, 0] for i in range(len(prompts))]
    steps = sum(len(seq.completion_ids) for seq in sequences)
    # 8 replies of 2 rows (24-byte headers), and the 12-byte ack of the CLOSE at the end
    assert received == steps * VOCAB * 2 + 24 * 8 + 12
    for prompt, seq in zip(prompts, sequences):
        ids = prompt + seq.completion_ids
        target = reference.full_logprobs("target", ids)
        rows = np.arange(len(prompt) - 1, len(ids) - 1)
        np.testing.assert_allclose(seq.tokens["logp_target"],
                                   target[rows, seq.completion_ids], atol=0.1)


# -- the alpha rules through both exact engines (issue 36) ------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("rule", [{"alpha_method": "ess_balance"},
                                  {"alpha_method": "entropy", "alpha_min": 0.5,
                                   "alpha_max": 0.9}])
def test_alpha_rules_give_the_same_tokens_on_both_exact_engines_and_match_numpy(
        servers, fused_server, reference, rule):
    """Each rule through the fused engine and the exact session path at one seed: the same
    tokens (as above), and each token's alpha against mixture.choose_alpha on transformers'
    full-vocabulary logprobs (helpers.assert_rule_alpha says its tolerance)."""
    prompts = [encode(reference, text) for text in TEXTS[:3]]
    two = exact(servers, prompts, seed=6, max_tokens=12, **rule)
    one = fused(fused_server, prompts, seed=6, max_tokens=12, **rule)
    assert [seq.completion_ids for seq in two] == [r["token_ids"] for r in one]
    for prompt, seq, result in zip(prompts, two, one):
        np.testing.assert_allclose(seq.tokens["alpha"], result["alpha"], atol=2e-5)
        ids = prompt + seq.completion_ids
        full = [reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t in range(len(seq.completion_ids)):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            assert_rule_alpha(seq.tokens["alpha"][t], a, b, rule)


# -- a teacher that sees the answer: per-model prompts (issue 36) -----------------------------
@pytest.mark.server
@pytest.mark.parametrize("top_k", [None, 20])
def test_each_model_scores_the_shared_completion_after_its_own_prompt(servers, reference,
                                                                      top_k):
    """theta reads the problem, the target the problem and its solution: every token's
    logp_theta is transformers' theta logprob after theta's prompt and the completion so far,
    logp_target the target's after its own (within 1e-4: the 2-layer models' float32 noise
    through a log-softmax), on the exact path and over the merged top-20 (where the token is
    in that server's top-20)."""
    theta_prompt = encode(reference, "Question: what is the standard library?\nAnswer:")
    target_prompt = encode(reference, "Question: what is the standard library?\n\n## Hint\n"
                                      "the modules that ship with Python\nAnswer:")
    item = PromptItem(0, "", theta_prompt, target_prompt="hinted",
                      target_prompt_ids=target_prompt)
    settings = SampleSettings(top_k=top_k, max_tokens=12, alpha=None, missing="kth",
                              concurrency=1, eos_token_ids=(), max_model_len=2048,
                              vocab_size=VOCAB, seed=2)

    async def run():
        done = []

        async def on_finished(seq):
            done.append(seq)

        async def items():
            yield item

        async with VLLMClient(servers.url("theta"), name="theta") as theta, \
                VLLMClient(servers.url("target"), name="target") as target:
            async with SessionTransport(theta, target) as transport:
                await Coordinator(transport, settings, on_finished).run(items())
        return done[0]

    seq = asyncio.run(run())
    completion = seq.completion_ids
    theta = reference.full_logprobs("theta", theta_prompt + completion)
    target = reference.full_logprobs("target", target_prompt + completion)
    for t, token in enumerate(completion):
        want_theta = theta[len(theta_prompt) - 1 + t, token]
        want_target = target[len(target_prompt) - 1 + t, token]
        if top_k is None or seq.tokens["in_topk_theta"][t]:
            assert abs(seq.tokens["logp_theta"][t] - want_theta) < 1e-4
        if top_k is None or seq.tokens["in_topk_target"][t]:
            assert abs(seq.tokens["logp_target"][t] - want_target) < 1e-4


@pytest.mark.server
def test_sample_mode_with_a_hinted_teacher_and_a_plain_policy_template(servers, fused_server,
                                                                       tmp_path):
    """data.theta_template (plain text) and data.target_template (chat, with the solution):
    records keep both prompts and the row's other fields; the messages rows hold theta's
    prompt; a fused server refuses per-model prompts with a ConfigError that says what to
    do."""
    import subprocess
    import sys

    from dual_sampling.files.records import read_records
    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?",
                                           "solution": str(2 * i), "id": f"p{i}"}) + "\n"
                               for i in range(3)))
    common = [f"data.prompts={prompts}", 'data.theta_template="Question: {problem}\\nAnswer:"',
              "data.theta_chat=false",
              'data.target_template="{problem}\\n\\n## Hint\\n{solution}"', "progress=false",
              "sample.max_tokens=8", "sample.report=false", "wandb.mode=disabled"]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "dual_sampling", "mode=sample",
                           f"theta.url={servers.url('theta')}",
                           f"target.url={servers.url('target')}", f"output_dir={out}",
                           *common], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = sorted(read_records(out / "samples.jsonl"), key=lambda r: r["index"])
    assert records[1]["prompt"] == "Question: What is 1 + 1?\nAnswer:"
    assert "## Hint\\n2" in records[1]["target_prompt"]
    assert records[1]["theta_prompt_token_ids"] == records[1]["prompt_token_ids"]
    assert records[1]["target_prompt_token_ids"] != records[1]["prompt_token_ids"]
    assert records[1]["fields"] == {"id": "p1"}
    merged = subprocess.run([sys.executable, "-m", "dual_sampling.merge", "--format",
                             "messages", str(out)], capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    rows = [json.loads(line) for line in (out / "messages.jsonl").read_text().splitlines()]
    assert rows[1]["messages"][0] == {"role": "user",
                                      "content": "Question: What is 1 + 1?\nAnswer:"}
    refused = subprocess.run([sys.executable, "-m", "dual_sampling", "mode=sample",
                              f"theta.url={fused_server.url('fused')}",
                              f"output_dir={tmp_path / 'fused'}", *common],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "sample.transport=session" in refused.stderr
def test_the_top_k_transports_import_without_torch():
    """The coordinator's own dependencies have no torch (pyproject): only the exact path
    imports it, so choose_exact can tell a torch-less install to add the `exact` extra."""
    import subprocess
    import sys
    code = ("import builtins\nreal = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name.split('.')[0] == 'torch': raise ImportError('no torch here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "import dual_sampling.core.transports.session, dual_sampling.core.sampling\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
