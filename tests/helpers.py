"""Checks shared by several test modules (the one place test modules import from each other's
helpers; each module's own fixtures stay in conftest.py)."""
from __future__ import annotations

import numpy as np

from dual_sampling import mixture


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
