"""The fused processor's state handling, driven on CPU with the call sequences vLLM makes.

No server: each test replays what a model runner does around `FusedSampler` (which rows are
in the batch, what their output-id lists hold, when `apply` runs) and puts both models'
log-softmax in the worker stash as the composite model would. The logprobs of a row depend
only on (request, position), so any two runners that present the same requests must give
the same tokens and the same records:
- V1, synchronous scheduling (what the CPU servers run);
- V1, async scheduling (vLLM's GPU default): a -1 placeholder ends the output-id list during
  `update_state` and is replaced before `apply`; a request that finished runs one more
  `apply` whose token is discarded; rows move within the persistent batch;
- V2 (Model Runner V2, the GPU default with Triton): `add_request` by slot, rows reordered
  every step, positions from `LogitsContext.pos`, a partial prefill, slots reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

from dual_sampling.vllm_plugin.fused import state
from dual_sampling.vllm_plugin.fused.sampler import FusedSampler
from dual_sampling.vllm_plugin.fused.setup import SAMPLER
from dual_sampling.wire.fused_format import EXTRA_KEY

VOCAB = 40


def params(tag: str, seed: int, alpha=None, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(max_tokens=8, extra_args={EXTRA_KEY: {
        "tag": tag, "seed": seed, "alpha": alpha, "temperature": temperature}})


def logprobs(request: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' log-softmax at `position` of `request`, (V,) each: peaked, differing."""
    rng = np.random.default_rng([request, position])
    logits = torch.as_tensor(rng.normal(size=(2, VOCAB)) * 3.0, dtype=torch.float32)
    return torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)


def stash_and_logits(batch: list[tuple[int, int]]) -> torch.Tensor:
    """Put the stash of logits rows `batch` = [(request, position), ...]; theta's logits."""
    pairs = [logprobs(r, p) for r, p in batch]
    state.put_logits(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
    return torch.stack([a for a, _ in pairs]).clone()


def forced_tokens(logits: torch.Tensor) -> list[int]:
    """The token each row was forced to (0 there, -inf elsewhere)."""
    assert torch.isneginf(logits).sum(-1).tolist() == [VOCAB - 1] * logits.shape[0]
    return logits.argmax(-1).tolist()


@dataclass
class Request:
    """One request: its tag, the length its completion stops at, its output ids."""

    index: int
    stop_at: int
    prompt_len: int = 5
    output: list[int] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"req-{self.index}"

    @property
    def params(self) -> SamplingParams:
        alpha = None if self.index % 2 == 0 else 0.3  # alpha* and a fixed alpha side by side
        return params(self.tag, seed=100 + self.index, alpha=alpha)


def fresh() -> FusedSampler:
    state._records.clear()
    state._removed_at.clear()
    return FusedSampler(None, torch.device("cpu"), False)


def pop(requests: list[Request]) -> dict[str, dict]:
    return state.pop({r.tag: len(r.output) for r in requests})


def run_v1(requests: list[Request], async_scheduling: bool) -> dict[str, dict]:
    """V1's persistent batch of two rows, requests queued. A request that finished leaves at
    the next `update_state`; with async scheduling the scheduler has already scheduled one
    more step for it, whose token is discarded, so it leaves one step later. A free row takes
    the next request, or the last row moves into it (vLLM's condense)."""
    sampler = fresh()
    waiting, batch = list(requests), {}
    in_flight: dict[int, int] = {}  # request -> its token not yet copied back (async)
    leaving: list[int] = []
    while waiting or batch:
        removed, moved, added = leaving, [], []
        for row in removed:
            batch.pop(row)
        leaving = []
        for row in range(2):
            if row not in batch and waiting:
                batch[row] = waiting.pop(0)
                added.append((row, batch[row].params, None, batch[row].output))
        if 0 not in batch and 1 in batch:
            batch[0] = batch.pop(1)
            moved.append((1, 0, MoveDirectionality.UNIDIRECTIONAL))
        if not batch:
            break
        sampler.update_state(BatchUpdate(len(batch), removed, added, moved))
        for request in batch.values():  # the model runner fills placeholders before apply
            if request.output and request.output[-1] == -1:
                request.output[-1] = in_flight.pop(request.index)
        order = sorted(batch)
        logits = sampler.apply(stash_and_logits([(batch[i].index, len(batch[i].output))
                                                 for i in order]))
        for row, token in zip(order, forced_tokens(logits)):
            request = batch[row]
            if len(request.output) == request.stop_at:  # the step after a finish (async)
                leaving.append(row)
                continue
            if async_scheduling:
                request.output.append(-1)
                in_flight[request.index] = token
            else:
                request.output.append(token)
                if len(request.output) == request.stop_at:
                    leaving.append(row)
    return pop(requests)


def run_v2(requests: list[Request]) -> dict[str, dict]:
    """V2: slots from a free list (reused), rows reordered every step, a partial prefill
    first for each request, one discarded step after each finish."""
    prompt_len = np.zeros(8, dtype=np.int32)
    sampler = FusedSampler(SimpleNamespace(speculative_config=None), SimpleNamespace(
        prompt_len=SimpleNamespace(np=prompt_len), prefill_len=SimpleNamespace(np=prompt_len)))
    state._records.clear()
    free, waiting, active = [6, 3], list(requests), {}
    prefilled: set[int] = set()
    extra_done: set[int] = set()
    step = 0
    while waiting or active:
        while free and waiting:
            slot, request = free.pop(), waiting.pop(0)
            prompt_len[slot] = request.prompt_len
            assert sampler.add_request(slot, request.params)
            active[slot] = request
        slots = sorted(active, reverse=step % 2 == 1)  # the row order changes every step
        pos = []
        for slot in slots:
            request = active[slot]
            if slot not in prefilled:  # first chunk of the prompt only: nothing to sample
                pos.append(request.prompt_len - 3)
            else:
                pos.append(request.prompt_len - 1 + len(request.output))
        batch = [(active[s].index, p + 1 - active[s].prompt_len) for s, p in zip(slots, pos)]
        state.put_logits(*(torch.stack(x) for x in zip(*[
            logprobs(r, max(p, 0)) for r, p in batch])))
        logits = torch.zeros(len(slots), VOCAB)
        mapping = torch.tensor(slots)
        ctx = LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping,
                            idx_mapping_np=mapping.numpy(),
                            expanded_local_pos=torch.zeros(len(slots), dtype=torch.int64),
                            input_ids=torch.zeros(len(slots), dtype=torch.int64),
                            pos=torch.tensor(pos), seq_lens_upper_bound_np=np.array(pos) + 1)
        out = sampler.apply(logits, ctx)
        for i, slot in enumerate(slots):
            request = active[slot]
            if slot not in prefilled:
                assert not torch.isneginf(out[i]).any()  # a partial prefill is left alone
                prefilled.add(slot)
            elif len(request.output) < request.stop_at:
                request.output.append(forced_tokens(out[i:i + 1])[0])
            else:
                extra_done.add(slot)
        for slot in extra_done:  # the slot is free; its state stays until reused
            active.pop(slot)
            prefilled.discard(slot)
            free.append(slot)
        extra_done.clear()
        step += 1
    return pop(requests)


def make_requests() -> list[Request]:
    return [Request(0, stop_at=6), Request(1, stop_at=3), Request(2, stop_at=5),
            Request(3, stop_at=4)]


def assert_same_records(got: dict, want: dict) -> None:
    """The same tokens; the float diagnostics to 1e-7: the kernels' block sums are OpenMP
    reductions whose order varies from run to run on CPU (seen: 1e-8 apart, 3 runs in 10)."""
    assert got.keys() == want.keys()
    for name in want:
        if name == "token":
            assert got[name] == want[name]
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-7, atol=1e-7)


def test_async_scheduling_gives_the_tokens_and_records_of_synchronous_scheduling():
    sync_requests, async_requests = make_requests(), make_requests()
    sync = run_v1(sync_requests, async_scheduling=False)
    assynced = run_v1(async_requests, async_scheduling=True)
    for a, b in zip(sync_requests, async_requests):
        assert len(a.output) == a.stop_at and b.output == a.output
        assert sync[a.tag]["token"] == a.output
        assert_same_records(assynced[b.tag], sync[a.tag])  # the discarded extra step: not in it


def test_model_runner_v2_gives_the_tokens_and_records_of_v1():
    v1_requests, v2_requests = make_requests(), make_requests()
    v1 = run_v1(v1_requests, async_scheduling=False)
    v2 = run_v2(v2_requests)
    for a, b in zip(v1_requests, v2_requests):
        assert b.output == a.output
        assert_same_records(v2[b.tag], v1[a.tag])


def test_a_record_keeps_positions_after_a_discarded_step():
    """A step vLLM ran past the end writes position n; the popped record stops at n, and a
    position past the record's end (a row the processor does not know) is not written."""
    sampler = fresh()
    out: list[int] = []
    sampler.update_state(BatchUpdate(1, [], [(0, params("t", 7), None, out)], []))
    for position in range(4):
        out.append(forced_tokens(sampler.apply(stash_and_logits([(0, position)])))[0])
    sampler.apply(stash_and_logits([(0, 4)]))  # the discarded step: position 4
    assert len(state._records["t"]["token"]) == 5
    state.put(["t"], [9], {name: [0.0] for name in state.FIELDS})  # a gap
    record = state.pop({"t": 4})["t"]
    assert record["token"] == out and all(len(v) == 4 for v in record.values())


def test_v2_a_request_resumed_after_preemption_keeps_its_record():
    """Resumed with 3 tokens: V2 re-prefills prompt + output (prefill_len 8) in chunks; a
    chunk's row is no position of the completion, the first full row samples position 3."""
    fresh()
    prompt_len, prefill_len = np.array([5]), np.array([5])
    sampler = FusedSampler(SimpleNamespace(speculative_config=None), SimpleNamespace(
        prompt_len=SimpleNamespace(np=prompt_len), prefill_len=SimpleNamespace(np=prefill_len)))

    def step(pos: int) -> torch.Tensor:
        ctx = LogitsContext(expanded_idx_mapping=torch.tensor([0]), idx_mapping=torch.tensor([0]),
                            idx_mapping_np=np.array([0]), expanded_local_pos=torch.tensor([0]),
                            input_ids=torch.tensor([0]), pos=torch.tensor([pos]),
                            seq_lens_upper_bound_np=np.array([pos + 1]))
        return sampler.apply(stash_and_logits([(0, max(pos + 1 - 5, 0))]), ctx)

    sampler.add_request(0, params("r", 3))
    tokens = [forced_tokens(step(4 + k))[0] for k in range(3)]  # positions 0, 1, 2
    prefill_len[0] = 8  # preempted, then resumed in another slot's place: same slot here
    sampler.add_request(0, params("r", 3))
    assert not torch.isneginf(step(5)).any()  # a chunk of the re-prefill: left alone
    tokens.append(forced_tokens(step(7))[0])  # position 3
    record = state.pop({"r": 4})["r"]
    assert record["token"] == tokens and len(record["alpha"]) == 4


def test_the_class_loads_in_both_model_runners():
    """One --logits-processors name for V1 and V2: both of vLLM's loaders accept it."""
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns
    assert _load_logitsprocs_by_fqcns([SAMPLER]) == [FusedSampler]
    assert _load_v2_logitsprocs_by_fqcns([SAMPLER]) == [FusedSampler]


def test_v2_refuses_speculative_decoding():
    with pytest.raises(ValueError, match="speculative decoding"):
        FusedSampler(SimpleNamespace(speculative_config=object()), SimpleNamespace())
