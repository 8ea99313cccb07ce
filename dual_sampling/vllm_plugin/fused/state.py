"""Worker-process state of a fused server, shared by the model, the sampler and the RPCs.

Three things live here, in each vLLM worker process (module globals: one engine a process):
- the step's stash: both models' logits over the tokenizer's ids, put by the composite
  model's `compute_logits` (fused/model.py) and taken by the logits processor
  (fused/sampler.py) in the same step;
- each tagged request's per-token diagnostics, appended by the processor, popped by the
  API server through `collective_rpc("dual_sampling_pop_diagnostics", args=({tag: n},))`,
  cut to the n tokens of the finished completion (a step vLLM ran past the end, as async
  scheduling does once after every finish, wrote position n: it never leaves the worker);
- counters (steps, seconds spent solving alpha*) for benchmarks.

`FusedWorkerExtension` is the `--worker-extension-cls` that start_vllm.sh --fused passes:
vLLM mixes it into its worker class, so its methods are reachable by name through
`engine_client.collective_rpc`. With tensor parallelism every rank holds the same records
(each samples from the same gathered logits); callers read rank 0's answer.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

import torch

from dual_sampling.maths.kernels import FIELDS
from dual_sampling.vllm_plugin.handoff import HandOff
from dual_sampling.vllm_plugin.theta_worker import ThetaWorkerExtension

ABANDONED_AFTER_S = 600.0  # records of requests gone from the batch this long are dropped

LOGITS: HandOff[tuple[torch.Tensor, torch.Tensor]] = HandOff("the fused model's logits")
_records: dict[str, dict[str, list]] = {}
_removed_at: dict[str, float] = {}
_lock = threading.Lock()  # records are written by the model step, popped by RPCs
_counters = {"steps": 0, "rows": 0, "solve_s": 0.0, "apply_s": 0.0, "solver_iters": 0,
             "proposed": 0, "accepted": 0, "emitted": 0, "verify_steps": 0,
             "verify_solve_s": 0.0, "verify_accept_s": 0.0, "verify_draw_s": 0.0,
             "verify_record_s": 0.0}


def put_logits(theta: torch.Tensor, target: torch.Tensor) -> None:
    """This step's logits of both models over the same ids, each (B, V) (unnormalised or
    log-softmaxed: the processor normalises them; views of the model's own tensors)."""
    LOGITS.put((theta, target), theta.shape[0])


def take_logits(rows: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The logits put this step for a batch of `rows` rows (then gone), or None (a dummy
    or warm-up run without the composite's forward)."""
    return LOGITS.take(rows)


def open_record(tag: str) -> None:
    """A tagged request joined the batch (again, after a preemption: its record goes on)."""
    with _lock:
        _records.setdefault(tag, {name: [] for name in FIELDS})
        _removed_at.pop(tag, None)


def put(tags: list[str], steps: list[int], columns: dict[str, list]) -> None:
    """Token `steps[i]` (its position in the completion) of each tags[i]; `columns[name][i]`
    is its value of FIELDS[name]. Entries from that position on are replaced: a step whose
    token vLLM discarded (a partial prefill, a step past the end) is overwritten by the
    step that counts, which has the same position."""
    with _lock:
        for i, (tag, step) in enumerate(zip(tags, steps)):
            record = _records.get(tag)
            if record is not None and len(record["token"]) >= step:
                for name in FIELDS:
                    del record[name][step:]
                    record[name].append(columns[name][i])


def mark_removed(tag: str) -> None:
    """The request left the batch (finished, aborted or preempted); drop stale records."""
    now = time.monotonic()
    with _lock:
        _removed_at[tag] = now
        for old in [t for t, at in _removed_at.items() if now - at > ABANDONED_AFTER_S]:
            _removed_at.pop(old)
            _records.pop(old, None)


def pop(lengths: dict[str, int]) -> dict[str, Optional[dict[str, list]]]:
    """Each tag's record cut to its first `lengths[tag]` tokens (None for a tag never seen),
    forgotten here."""
    out = {}
    with _lock:
        for tag, n in lengths.items():
            record = _records.pop(tag, None)
            _removed_at.pop(tag, None)
            out[tag] = None if record is None else {k: v[:n] for k, v in record.items()}
    return out


def count(rows: int, solve_s: float, apply_s: float, iters: int) -> None:
    _counters["steps"] += 1
    _counters["rows"] += rows
    _counters["solve_s"] += solve_s
    _counters["apply_s"] += apply_s
    _counters["solver_iters"] += iters


def count_speculation(proposed: int, accepted: int, emitted: int,
                      seconds: Optional[dict[str, float]] = None) -> None:
    """One speculative verify step: draft tokens proposed and accepted, tokens emitted, and
    the seconds of its parts (solve, accept, draw, record: verify.verify)."""
    _counters["verify_steps"] += 1
    for part, value in (seconds or {}).items():
        _counters[f"verify_{part}_s"] += value
    _counters["proposed"] += proposed
    _counters["accepted"] += accepted
    _counters["emitted"] += emitted


def kv_cache_summary(kv_cache_config: Any) -> dict[str, Any]:
    """The engine's KV cache as allocated: its groups, and per group the layers, block size,
    bytes per token (summed over the group's layers) and token capacity."""
    groups = []
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        groups.append({"layers": len(group.layer_names), "block_size": spec.block_size,
                       "bytes_per_token": spec.page_size_bytes // spec.block_size,
                       "kind": type(spec).__name__})
    blocks = kv_cache_config.num_blocks
    return {"groups": groups, "num_blocks": blocks,
            "tokens": blocks * groups[0]["block_size"] if len(groups) == 1 else None}


class FusedWorkerExtension(ThetaWorkerExtension):
    """Methods vLLM adds to its worker class (`--worker-extension-cls`), called by name;
    load_theta's too (theta_worker.py: vLLM takes one extension class a server)."""

    def dual_sampling_pop_diagnostics(self, lengths: dict[str, int]) -> dict[str, Any]:
        return pop(lengths)

    def dual_sampling_counters(self) -> dict[str, Any]:
        return dict(_counters, open_records=len(_records))

    def dual_sampling_engine(self) -> dict[str, Any]:
        """How this engine runs the fused model: model runner, scheduling, KV cache."""
        config = self.vllm_config
        speculative = config.speculative_config
        return {"model_runner": "v2" if getattr(self, "use_v2_model_runner", False) else "v1",
                "async_scheduling": bool(config.scheduler_config.async_scheduling),
                "speculate": int(speculative.num_speculative_tokens) if speculative else 0,
                "kv_cache": kv_cache_summary(self.model_runner.kv_cache_config)}
