"""The patch registry (dual_sampling/vllm_plugin/patches.py): every vLLM method the plugin
replaces goes through `patches.replace`, is listed in compat.py under its feature (so an
upgrade of vLLM that moves it fails test_compat.py's check of that name), is replaced once
however often the plugin loads, and `undo` gives vLLM back."""
from __future__ import annotations

import pytest

from dual_sampling.vllm_plugin import compat, patches

EXPECTED = {  # every replacement the plugin makes, by feature: a new one is added here
    ("shm_spin_cap", "SpinCondition.wait"),
    ("input_gap", "EngineCoreProc._process_input_queue"),
    ("session_gate", "AsyncMPClient.add_request_async"),
    ("raw_prompt_logprobs", "LogprobsProcessor.from_new_request"),
    ("raw_prompt_logprobs", "LogprobsProcessor._update_prompt_logprobs"),
    ("fused", "SamplingParams.verify"),
    ("speculative", "GPUModelRunner._sample"),
    ("speculative", "SpecDecodeBaseProposer._sample_from_logits"),
}


def install_everything() -> None:
    from vllm.v1.engine.core_client import AsyncMPClient

    from dual_sampling.vllm_plugin import raw_logprobs, session, tuning
    from dual_sampling.vllm_plugin.fused import speculate, stock
    tuning.cap_spin(0.001, 0.05)
    tuning.gather_input(0.001)
    raw_logprobs.install()
    stock.install()
    speculate.install()

    class Engine:  # the gate wraps one engine client's method, not the class's
        engine_core = AsyncMPClient.__new__(AsyncMPClient)
    session._SendGate(Engine())


@pytest.fixture
def installed():
    patches.undo()
    compat.usable.cache_clear()
    install_everything()
    yield
    patches.undo()


def test_every_replacement_is_registered_and_listed_in_compat(installed):
    got = {(r.feature, r.name) for r in patches.APPLIED.values()}
    assert got == EXPECTED
    listed = {(feature, f"{entry.module}.{entry.name}")
              for feature, entries in compat.PRIVATE.items() for entry in entries}
    for replaced in patches.APPLIED.values():
        assert (replaced.feature, f"{replaced.module}.{replaced.name}") in listed, replaced


def test_loading_twice_wraps_once_and_undo_gives_vllm_back(installed):
    from vllm import SamplingParams
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    ours = SamplingParams.verify, GPUModelRunner._sample, LogprobsProcessor.from_new_request
    stock = [patches.original_of(f) for f in ours]
    install_everything()  # vLLM may run the plugin's hooks twice in one process
    assert (SamplingParams.verify, GPUModelRunner._sample) == ours[:2]
    assert patches.original_of(LogprobsProcessor.from_new_request) is stock[2]
    assert all(problem is None for feature in ("raw_prompt_logprobs", "fused", "speculative")
               for problem in compat.problems(feature))  # signatures read through ours
    patches.undo()
    assert SamplingParams.verify is stock[0] and GPUModelRunner._sample is stock[1]
    assert "from_new_request" in vars(LogprobsProcessor)
    assert isinstance(vars(LogprobsProcessor)["from_new_request"], classmethod)
    assert not hasattr(patches.original_of(LogprobsProcessor.from_new_request),
                       patches.SETTING)


def test_a_handoff_reaches_only_the_batch_it_was_put_for():
    """Per-step data between patched methods (vllm_plugin/handoff.py): a reader of another
    batch size (a dummy run) gets nothing, and a taken value is gone."""
    from dual_sampling.vllm_plugin.handoff import HandOff
    box: HandOff[str] = HandOff("test")
    box.put("logits", rows=3)
    assert box.take(2) is None and box.refused == 1
    assert box.take(3) is None  # the mismatched take dropped it: never a stale value
    box.put("seeds", rows=4)
    assert box.peek(4) == "seeds" and box.peek(4) == "seeds"  # the draft's K reads
    assert box.take(4) == "seeds" and box.peek(4) is None
