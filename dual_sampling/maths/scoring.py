"""Scores of given completions from actual-token logprobs: numpy, no I/O (score mode).

A scored sequence is a prompt's token ids followed by one completion's, so its
actual-token logprobs `(L-1,)` hold row j = log p(token j+1 | tokens 0..j): the completion's
tokens are the rows from P-1 on (P prompt tokens). Natural logs throughout.
"""
from __future__ import annotations

import numpy as np


def completion_rows(actual: np.ndarray, num_prompt_tokens: int) -> np.ndarray:
    """The completion tokens' logprobs `(m,)` from a sequence's actual-token logprobs `(L-1,)`."""
    return actual[num_prompt_tokens - 1:]


def sequence_sums(lengths: np.ndarray, flat_logp: np.ndarray) -> np.ndarray:
    """Sum of each sequence's logprobs `(S,)` from their concatenation `(sum m,)`; m >= 1 each."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # (S,)
    return np.add.reduceat(flat_logp, starts)


def normalise_within_groups(sum_logp: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """Each sequence's probability among its group's `(S,)`: softmax of `sum_logp (S,)` over
    consecutive groups of `group_sizes (G,)` sequences (a prompt's completions)."""
    group = np.repeat(np.arange(len(group_sizes)), group_sizes)  # (S,)
    starts = np.concatenate(([0], np.cumsum(group_sizes)[:-1]))  # (G,)
    peak = np.maximum.reduceat(sum_logp, starts)[group]  # (S,)
    shifted = np.exp(sum_logp - peak)  # (S,) in (0, 1], the group's best at 1
    return shifted / np.add.reduceat(shifted, starts)[group]

