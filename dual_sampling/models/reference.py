"""Exact full-vocabulary reference with `transformers`, for tests and measurements.

Loads the theta and target models in float32, in-process, and answers what the servers
answer only in part: next-token log-probabilities over the whole vocabulary at every
position, alpha* and q* over the whole vocabulary next to the same computed from top-k lists
only, and sliding-window perplexity sums. The only module of the package that imports torch.

    from dual_sampling.models.reference import Reference
    from dual_sampling.models.tiny_models import ensure_tiny_models
    ref = Reference(ensure_tiny_models())
    ref.full_logprobs("theta", ref.tokenizer("Some text.")["input_ids"])  # (L, V)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dual_sampling.maths.mixture import Candidates, log_mixture, merge_topk, solve_alpha

ModelName = Literal["theta", "target"]


class AlphaComparison(NamedTuple):
    """alpha* and q* at every position of a text: over the full vocabulary, and from top-k only.

    Row i is the next-token distribution after token_ids[: i + 1]; natural logs.
    """

    alpha_full: np.ndarray  # (L,) alpha* over the whole vocabulary
    log_q_full: np.ndarray  # (L, V) log q* over the whole vocabulary, normalised
    candidates: Candidates  # (L, M) the merged top-k lists of the two models
    alpha_topk: np.ndarray  # (L,) alpha* from the merged top-k lists only
    log_q_topk: np.ndarray  # (L, M) log q* on the candidates, normalised over them


class Reference:
    """The theta and target models loaded float32 in this process; read-only, no gradients."""

    def __init__(self, model_dirs: Mapping[str, str | os.PathLike], device: str = "cpu"):
        """model_dirs: `{"theta": dir, "target": dir}`, e.g. from `ensure_tiny_models()`;
        device: where the float32 models run (results come back as numpy either way)."""
        self.device = torch.device(device)
        self.models = {
            name: AutoModelForCausalLM.from_pretrained(
                model_dirs[name], dtype=torch.float32).to(self.device).eval()
            for name in ("theta", "target")
        }
        self.tokenizer = AutoTokenizer.from_pretrained(model_dirs["theta"])
        # output rows past the tokenizer's vocabulary are padding: never a token, not scored
        self.vocab_size = len(self.tokenizer)
        rows = {name: model.config.vocab_size for name, model in self.models.items()}
        if min(rows.values()) < self.vocab_size:
            raise ValueError(f"a model has fewer output rows than the tokenizer's "
                             f"{self.vocab_size} tokens: {rows}")

    def full_logprobs(self, model: ModelName, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token log-softmax at every position, (L, V) float64; row i follows token_ids[:i+1].

        V is the tokenizer's vocabulary: padded output rows are dropped before the softmax."""
        ids = self._check_ids(token_ids)
        with torch.no_grad():
            logits = self.models[model](input_ids=ids[None]).logits[0, :, :self.vocab_size]
        return torch.log_softmax(logits.double(), dim=-1).cpu().numpy()

    def position_logprobs(self, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(logp_theta (V,), logp_target (V,)): the next token after all of token_ids."""
        return (self.full_logprobs("theta", token_ids)[-1],
                self.full_logprobs("target", token_ids)[-1])

    def alpha_full(self, token_ids: Sequence[int], top_k: int = 20,
                   missing: str = "kth") -> AlphaComparison:
        """alpha*, q* at every position over the full vocabulary and from each model's top_k only.

        The top-k side sees what a server returns with `logprobs=top_k`: each model's top_k ids
        and log-probabilities, merged by `merge_topk(..., missing=missing)`.
        """
        logp_theta = self.full_logprobs("theta", token_ids)  # (L, V)
        logp_target = self.full_logprobs("target", token_ids)  # (L, V)
        alpha_full = solve_alpha(logp_theta, logp_target)  # (L,)
        ids_theta = np.argsort(-logp_theta, axis=-1, kind="stable")[:, :top_k]  # (L, K)
        ids_target = np.argsort(-logp_target, axis=-1, kind="stable")[:, :top_k]  # (L, K)
        candidates = merge_topk(
            ids_theta, np.take_along_axis(logp_theta, ids_theta, axis=-1),
            ids_target, np.take_along_axis(logp_target, ids_target, axis=-1),
            missing=missing, vocab_size=self.vocab_size)
        alpha_topk = solve_alpha(candidates.logp_theta, candidates.logp_target)  # (L,)
        return AlphaComparison(
            alpha_full=alpha_full,
            log_q_full=log_mixture(logp_theta, logp_target, alpha_full),
            candidates=candidates,
            alpha_topk=alpha_topk,
            log_q_topk=log_mixture(candidates.logp_theta, candidates.logp_target, alpha_topk),
        )

    def sliding_window_nll(self, model: ModelName, token_ids: Sequence[int], context_length: int,
                           stride: int) -> tuple[float, int]:
        """(total NLL in nats, tokens scored) by the Hugging Face perplexity guide's sliding window.

        Windows start every `stride` tokens and span up to `context_length`; the first window
        scores all its tokens after the first, each later one scores only the tokens past the
        previous window's end, the overlap serving as context (labels -100 in the guide). With
        stride < context_length every token after the first is scored exactly once
        (n_scored = L - 1); with stride == context_length a window's first token has no
        context and is not scored. Perplexity = exp(total_nll / n_scored). Unlike the guide,
        which weights each window's mean loss by its label count minus one, the per-token NLLs
        are summed exactly.
        """
        ids = self._check_ids(token_ids)
        if not 0 < stride <= context_length:
            raise ValueError(f"need 0 < stride <= context_length, got stride={stride}, "
                             f"context_length={context_length}")
        total_nll, n_scored, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + context_length, len(ids))
            first_target = max(prev_end, begin + 1)  # tokens before it are context only
            if first_target < end:
                with torch.no_grad():
                    window = ids[None, begin:end]
                    logits = self.models[model](input_ids=window).logits[0, :, :self.vocab_size]
                logp = torch.log_softmax(logits.double(), dim=-1)  # (W, V)
                rows = torch.arange(first_target - 1, end - 1, device=ids.device) - begin
                total_nll -= logp[rows, ids[first_target:end]].sum().item()
                n_scored += end - first_target
            prev_end = end
            if end == len(ids):
                break
        return total_nll, n_scored

    def _check_ids(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))  # (L,)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("token_ids must be a non-empty 1-D list of ids, "
                             f"got shape {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token_ids must lie in [0, {self.vocab_size}), "
                             f"got [{ids.min().item()}, {ids.max().item()}]")
        return ids.to(self.device)
