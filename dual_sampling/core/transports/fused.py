"""The fused transport: whole completions from one server holding both models.

    coordinator = FusedCoordinator(client, FusedSettings(...), on_finished)
    await coordinator.run(prompts)        # prompts: an async iterator of PromptItem

A fused server (start_vllm.sh --fused; dual_sampling/vllm_plugin/fused/) runs pi_theta
and pi_t in one vLLM engine and samples every token inside vLLM's decode loop from the
exact q* over the full vocabulary, recording each token's diagnostics in the engine. So
nothing happens per token here: each prompt is one POST to the server's fused route, which
returns the completion with its per-token alpha, logprobs, KLs and entropy; vLLM batches
all requests in flight (`concurrency` of them) continuously.

Reproducibility: sample s of prompt i is drawn with the seed `prompt_seed(seed, i, s)` (one
uniform per token from (seed, position), drawn in the engine), so its tokens depend on the
seed, the prompt and the weights only: not on batching, replicas, retries or resume. A
group of `sample.n` completions is n requests, one per sample. Failures are
the client's (`VLLMClient`: retries on connection errors and 5xx, then `ServerError`);
a retried request gives the same tokens.

Same contract as `dual_sampling.core.coordinator.Coordinator` for modes/sample.py: `run`,
`unfinished` (prompts taken but not handed to `on_finished` when `run` raised), `wait_s`,
`total_s`, `transport.aclose()`.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable, Optional

import numpy as np

from dual_sampling.clients.client import VLLMClient
from dual_sampling.core.coordinator import (TOKEN_FIELDS, PromptItem, Sequence, StepStats,
                                       prompt_seed)
from dual_sampling.errors import MalformedResponseError
from dual_sampling.wire.fused_format import GENERATE_PATH, TokenArgs, generate_body, read_result


@dataclass
class FusedSettings:
    max_tokens: int
    alpha: Optional[float]
    concurrency: int
    max_model_len: int
    temperature: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = False  # every completion max_tokens long (benchmarks)
    alpha_method: str = "kl_symmetry"  # config.ALPHA_METHODS
    alpha_min: float = 0.0
    alpha_max: float = 1.0

    def token_args(self) -> TokenArgs:
        """How the engine chooses each token (fused_format.TokenArgs; seeds per prompt)."""
        return TokenArgs(tag=None, seed=0, alpha=self.alpha, temperature=self.temperature,
                         alpha_method=self.alpha_method, alpha_min=self.alpha_min,
                         alpha_max=self.alpha_max)


class FusedCoordinator:
    """Keeps `concurrency` prompts in flight on one fused server; see the module docstring."""

    def __init__(self, client: VLLMClient, settings: FusedSettings,
                 on_finished: Callable[[Sequence], Awaitable[None]],
                 on_step: Optional[Callable[[StepStats], None]] = None) -> None:
        self.client = client
        self.settings = settings
        self.args = settings.token_args()  # checked here, before any request
        self.on_finished = on_finished
        self.on_step = on_step
        self.transport = self  # what modes/sample.generate closes
        self.wait_s = 0.0  # wall time with at least one request in flight
        self._in_flight = 0
        self._busy_since = 0.0
        self.total_s = 0.0
        self.tokens_generated = 0
        self.unfinished: list[PromptItem] = []

    async def aclose(self) -> None:
        return None

    async def run(self, prompts: AsyncIterator[PromptItem]) -> None:
        taken: dict[tuple[int, int], PromptItem] = {}  # (index, sample_index) in flight
        waiting: list[tuple[PromptItem, int]] = []  # samples of prompts taken, not started
        start = time.perf_counter()
        self.unfinished = []

        async def next_sample() -> tuple[PromptItem, int]:
            while not waiting:  # StopAsyncIteration ends the worker
                item = await anext(prompts)
                waiting.extend((item, sample) for sample in item.sample_indices)
            return waiting.pop(0)

        async def worker() -> None:
            while True:
                try:
                    item, sample = await next_sample()
                except StopAsyncIteration:
                    return
                taken[item.index, sample] = item
                await self.on_finished(await self._complete(item, sample))
                taken.pop((item.index, sample))

        workers = [asyncio.create_task(worker()) for _ in range(self.settings.concurrency)]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.unfinished = [replace(item, sample_indices=(sample,)) for item, sample in
                               [(item, s) for (_, s), item in taken.items()] + waiting]
            raise
        finally:
            self.total_s += time.perf_counter() - start

    async def _complete(self, item: PromptItem, sample_index: int) -> Sequence:
        s = self.settings
        room = max(1, min(s.max_tokens, s.max_model_len - len(item.prompt_ids)))
        t0 = time.perf_counter()
        if self._in_flight == 0:
            self._busy_since = t0
        self._in_flight += 1
        try:
            reply = await self.client.request("POST", GENERATE_PATH, generate_body(
                [item.prompt_ids], [prompt_seed(s.seed, item.index, sample_index)], room,
                self.args, s.stop, s.ignore_eos))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.wait_s += time.perf_counter() - self._busy_since
        wait_s = time.perf_counter() - t0
        seq = self._sequence(item, sample_index, reply)
        n = len(seq.completion_ids)
        self.tokens_generated += n
        if self.on_step is not None:
            tokens = seq.tokens
            self.on_step(StepStats(
                batch=n, alpha=np.asarray(tokens["alpha"]),
                kl_q_theta=np.asarray(tokens["kl_q_theta"]),
                kl_q_target=np.asarray(tokens["kl_q_target"]),
                coverage_theta=np.ones(n), coverage_target=np.ones(n), wait_s=wait_s,
                step_s=time.perf_counter() - t0))
        return seq

    def _sequence(self, item: PromptItem, sample_index: int, reply: dict) -> Sequence:
        """The coordinator's Sequence of one reply: coverage 1 and in-top-k true per token."""
        where = f"{self.client.name} server at {self.client.url} (POST {GENERATE_PATH})"
        try:
            ids, exact, finish = read_result(reply["results"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MalformedResponseError(f"{where} answered without a readable result "
                                         f"({exc}): {str(reply)[:200]}") from exc
        full = {"coverage_theta": 1.0, "coverage_target": 1.0, "in_topk_theta": True,
                "in_topk_target": True}
        tokens = {name: exact[name] if name in exact else [full[name]] * len(ids)
                  for name in TOKEN_FIELDS}
        return Sequence(item=item, sample_index=sample_index, key=0, completion_ids=ids,
                        tokens=tokens,
                        finish_reason="stop" if finish == "stop" else "length")
