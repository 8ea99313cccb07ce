"""The real-model tier on two real vLLM CPU servers (theta and target): the session
transport over the merged top-k, score, topk and perplexity, against transformers on the
same float32 weights. Fixtures, tolerance and its derivation: test_real_fused.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from dual_sampling.api import SyncDualSampler
from dual_sampling.serving.launch import Servers
from helpers import (CHATS, LOGP_TOL, alpha_bound, chat_ids, chernoff_alpha, exact_sequences,
                     topk_of)


@pytest.fixture(scope="module")
def real_pair(real_models, real_fused_engine, tmp_path_factory) -> Servers:
    real_fused_engine.stop()  # test_real_fused.py's server: never up beside the pair
    server = Servers(run_dir=tmp_path_factory.mktemp("vllm_real_pair"),
                     models=dict(real_models), extra=("--max-model-len", "2048"))
    server.start("theta", "target")
    yield server
    server.stop()


def _exact_session(real_pair, prompts: list[list[int]], seed: int, temperature: float) -> list:
    """Sequences of the exact session path (top_k unset) on the real pair."""
    return exact_sequences(real_pair.url("theta"), real_pair.url("target"), prompts, seed=seed,
                           max_tokens=24, temperature=temperature, concurrency=len(prompts))


# real_fused_draws (session-scoped, taken from the real fused server when it first started)
# comes before real_pair, whose fixture stops that server: the two never hold memory together
@pytest.mark.server
def test_exact_session_gives_the_fused_engines_tokens_and_exact_fields(real_fused_draws,
                                                                      real_pair,
                                                                      real_reference):
    """The exact two-engine path at the fused engine's seed: the same tokens on every
    sequence. Both sides run the same kernels on logits that differ by float32 noise
    (2e-5 between engines of these models, see test_real_fused.py), so a token can differ
    only where a uniform falls within that of a CDF boundary: about 1e-4 of draws; 4 x 24
    draws expect 0.01 such sequences, and a later token then differs too, so at most one
    sequence may differ (counted in the message). Every field is within LOGP_TOL of
    transformers + scipy over the full vocabulary, alpha* within alpha_bound."""
    from dual_sampling.maths import mixture
    draws = real_fused_draws
    sequences = _exact_session(real_pair, draws["prompts"], draws["seed"],
                               draws["temperature"])
    differ = [i for i, (seq, fused) in enumerate(zip(sequences, draws["results"]))
              if seq.completion_ids != fused["token_ids"]]
    assert len(differ) <= 1, f"sequences {differ} differ from the fused engine's"
    tau = 1 / draws["temperature"]
    for prompt, seq in zip(draws["prompts"], sequences):
        ids = prompt + seq.completion_ids
        full = [real_reference.full_logprobs(m, ids) for m in ("theta", "target")]
        for t, token in enumerate(seq.completion_ids):
            a, b = (f[len(prompt) - 1 + t] for f in full)
            alpha = chernoff_alpha(a, b)
            assert abs(seq.tokens["alpha"][t] - alpha) <= alpha_bound(a, b, alpha)
            log_q = mixture.log_mixture(a, b, alpha)
            diag = mixture.token_diagnostics(a, b, log_q)
            tempered = tau * log_q - np.logaddexp.reduce(tau * log_q)
            np.testing.assert_allclose(
                [seq.tokens[f][t] for f in ("logp_theta", "logp_target", "logp_q",
                                            "kl_q_theta", "kl_q_target", "entropy_q")],
                [a[token], b[token], tempered[token], diag["kl_q_theta"],
                 diag["kl_q_target"], diag["entropy_q"]], atol=LOGP_TOL)


@pytest.mark.server
def test_session_transport_over_the_merged_top_k(real_pair, real_reference, tmp_path):
    """Each server's logprob of the chosen token is exact where it is in that server's
    top-20; alpha over the merged top-20 is near the full-vocabulary alpha* (0.013 apart on
    average on real text, issue 26's measurement)."""
    with SyncDualSampler(real_pair.url("theta"), real_pair.url("target"), transport="session",
                         top_k=20, chat_template=True) as sampler:
        records = sampler.sample([{"messages": m} for m in CHATS[:2]], max_tokens=24, seed=3)
    gaps = []
    for r in records:
        ids = r["prompt_token_ids"] + r["completion_token_ids"]
        full = [real_reference.full_logprobs(m, ids) for m in ("theta", "target")]
        rows = np.arange(len(r["prompt_token_ids"]) - 1, len(ids) - 1)
        chosen = np.array(r["completion_token_ids"])
        for model, logp in zip(("theta", "target"), full):
            exact, got = logp[rows, chosen], np.array(r[f"logp_{model}"])
            listed = np.array(r[f"in_topk_{model}"])
            # exact where the token is in that server's top-20; else the k-th logprob
            # stands in (missing="kth"), which is at least the token's own
            np.testing.assert_allclose(got[listed], exact[listed], atol=LOGP_TOL)
            assert (got[~listed] >= exact[~listed] - LOGP_TOL).all()
        gaps += [abs(r["alpha"][t] - chernoff_alpha(full[0][row], full[1][row]))
                 for t, row in enumerate(rows)]
    assert np.mean(gaps) < 0.05


@pytest.mark.server
def test_score_topk_and_perplexity_match_transformers(real_pair, real_reference, tmp_path):
    from dual_sampling.config import (PerplexityParams, PerplexityRunConfig, SequenceDataConfig,
                                      ServerConfig, WandbConfig)
    from dual_sampling.modes import perplexity
    from dual_sampling.wire.topk_format import error_bound

    prompts = [{"messages": m} for m in CHATS[:2]]
    completions = ["The capital of France is Paris.", "Leaves fall slowly down"]
    with SyncDualSampler(real_pair.url("theta"), real_pair.url("target"),
                         chat_template=True) as sampler:
        scores = sampler.score(prompts, completions)
    for row in scores:
        ids = row["prompt_token_ids"] + row["completion_token_ids"]
        rows = np.arange(len(row["prompt_token_ids"]) - 1, len(ids) - 1)
        for model in ("theta", "target"):
            exact = real_reference.full_logprobs(model, ids)[rows, row["completion_token_ids"]]
            np.testing.assert_allclose(row[f"logp_{model}"], exact, atol=LOGP_TOL)
            assert row[f"sum_logp_{model}"] == pytest.approx(exact.sum(),
                                                             abs=LOGP_TOL * len(rows))

    text = chat_ids(real_reference, CHATS[3]) + real_reference.tokenizer(
        " Take short breaks and keep your phone in another room.")["input_ids"]
    (result,) = topk_of(real_pair.url("target"), [text], k=20, fmt="fp16")
    full = real_reference.full_logprobs("target", text)[:-1]  # (L-1, V)
    exact = np.take_along_axis(full, result.ids, -1)  # (L-1, 20)
    assert (np.abs(result.logp - exact) <= error_bound(exact, "fp16") + LOGP_TOL).all()
    # the top 20 ids: nothing left out scores higher than the 20th listed
    assert (exact[:, -1] >= np.sort(full, -1)[:, -20] - LOGP_TOL).all()

    corpus = tmp_path / "corpus.txt"
    from dual_sampling.models.tiny_models import corpus_path
    corpus.write_text(corpus_path().read_text(encoding="utf-8")[:6000], encoding="utf-8")
    got = perplexity.run(PerplexityRunConfig(
        output_dir=str(tmp_path / "ppl"), model=ServerConfig(url=real_pair.url("target")),
        data=SequenceDataConfig(path=[str(corpus)]),
        ppl=PerplexityParams(context_length=512, stride=256),
        wandb=WandbConfig(mode="disabled"), progress=False))["corpora"][0]
    # ppl.add_bos puts the model's BOS id first (this tokenizer adds none by itself)
    ids = [real_reference.tokenizer.bos_token_id] + real_reference.tokenizer(
        corpus.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    nll, scored = real_reference.sliding_window_nll("target", ids, 512, 256)
    assert got["num_tokens"] == scored
    # a per-token noise of ~1e-4 averages to far less over ~1,300 tokens
    assert got["perplexity"] == pytest.approx(np.exp(nll / scored), rel=LOGP_TOL)
    assert got["perplexity"] < 30  # real text under a real model, not a random one


