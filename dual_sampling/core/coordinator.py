"""The per-token loop of dual sampling over a continuously refilled batch of prompts.

Each step sends every active sequence to both servers at once (one batched request per
server, the two in parallel), merges the two top-k candidate sets, solves alpha* per row
(or uses a fixed alpha), samples each row's next token from q* tempered to q*^(1/T) with
that sequence's own random generator, and retires finished sequences, whose slots new
sequences take at the next step. A prompt gives `n` sequences (its group), one per
sample_index. Detokenising and writing a finished record run as tasks beside the loop.

Reproducibility: sample s of prompt i draws its uniforms from `sequence_rng(seed, i, s)`,
so the tokens depend on the seed and the servers' answers only, not on batching, group
size, transport or resume.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Protocol

import numpy as np

from dual_sampling.maths import mixture


def sequence_seed(seed: int, index: int, sample_index: int) -> list[int]:
    """Entropy of sample `sample_index` of prompt `index`: one stream per (prompt, sample).

    Sample 0 keeps `[seed, index]`, the stream of every dataset written before groups (for
    every seed, however large), so n = 1 reproduces those token for token; sample s >= 1
    uses `[seed, index, s]`. A fused engine seeds its per-request generator from the same.
    """
    return [seed, index] if sample_index == 0 else [seed, index, sample_index]


def prompt_seed(seed: int, index: int, sample_index: int = 0) -> int:
    """The counter-based seed of one sample (63 bits): the fused engine and the exact
    session transport draw token t's uniform from (this seed, t) (kernels.uniforms)."""
    entropy = sequence_seed(seed, index, sample_index)
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def sequence_rng(seed: int, index: int, sample_index: int) -> np.random.Generator:
    """The generator whose `random()` gives the uniforms of one sequence, one per token."""
    return np.random.Generator(np.random.PCG64(sequence_seed(seed, index, sample_index)))


class Transport(Protocol):
    """How one step reaches the two servers.

    `keys` name the sequences (unique while a sequence is active): a stateful transport
    sends a new key's whole context and, for a key it has seen, only the tokens appended
    since its last step. `release` tells it a sequence is done (finished or abandoned).
    """

    async def step(self, keys: list[int], contexts: list[list[int]], k: int,
                   *target_contexts: list[list[int]]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top-k of theta and of target after each context: ids and logprobs, each (B, k).
        A fourth argument, when given, holds the target's own contexts (per-model prompts);
        the coordinator passes it only then."""

    async def release(self, keys: list[int]) -> None:
        """Forget these sequences (free their server-side state, if any)."""

    async def aclose(self) -> None:
        """Close connections; server-side state of unreleased sequences is freed."""


@dataclass
class PromptItem:
    """A prompt ready to generate from, and which samples of its group are still to do."""

    index: int
    prompt: str
    prompt_ids: list[int]
    sample_indices: tuple[int, ...] = (0,)
    # the target's own prompt (a teacher that sees a hint or the solution; per-model
    # templates), None: the target reads theta's; the completion is shared
    target_prompt: Optional[str] = None
    target_prompt_ids: Optional[list[int]] = None
    fields: dict[str, Any] = field(default_factory=dict)  # the row's other fields, kept


class PromptQueue:
    """Prompts tokenised ahead of demand, shared by the coordinators of all replica pairs.

    An async iterator that several coordinators may pull from at once; `requeue` gives
    back the prompts of a failed replica so that another one restarts them.
    """

    def __init__(self, prompts: list[Any], tokenize: Callable[[Any], Awaitable[PromptItem]],
                 lookahead: int) -> None:
        self._pending = list(reversed(prompts))
        self._ready: list[PromptItem] = []
        self._tokenize = tokenize
        self._lookahead = lookahead
        self._lock = asyncio.Lock()

    def __aiter__(self) -> "PromptQueue":
        return self

    async def __anext__(self) -> PromptItem:
        async with self._lock:
            if not self._ready and self._pending:
                chunk = [self._pending.pop() for _ in range(min(self._lookahead, len(self._pending)))]
                try:
                    self._ready = list(reversed(await asyncio.gather(*map(self._tokenize, chunk))))
                except BaseException:
                    self._pending.extend(reversed(chunk))
                    raise
            if not self._ready:
                raise StopAsyncIteration
            return self._ready.pop()

    def requeue(self, items: list[PromptItem]) -> None:
        self._ready.extend(items)

    @property
    def empty(self) -> bool:
        return not self._ready and not self._pending


TOKEN_FIELDS = ("alpha", "logp_theta", "logp_target", "logp_q", "kl_q_theta", "kl_q_target",
                "entropy_q", "coverage_theta", "coverage_target", "in_topk_theta",
                "in_topk_target")


@dataclass
class Sequence:
    """One sample of a prompt being completed; per-token lists grow by one each step.

    `key` names it to the transport: unique among the coordinator's sequences.
    """

    item: PromptItem
    sample_index: int
    key: int
    rng: Optional[np.random.Generator] = None  # the per-token transports' uniforms (not fused)
    completion_ids: list[int] = field(default_factory=list)
    tokens: dict[str, list] = field(default_factory=lambda: {f: [] for f in TOKEN_FIELDS})
    candidates: list[dict[str, list]] = field(default_factory=list)
    finish_reason: Optional[str] = None

    @property
    def context(self) -> list[int]:
        return self.item.prompt_ids + self.completion_ids

    @property
    def target_context(self) -> list[int]:
        """The target's prompt (its own, if the item has one) and the shared completion."""
        prompt = self.item.target_prompt_ids
        return self.context if prompt is None else prompt + self.completion_ids


@dataclass
class SampleSettings:
    top_k: Optional[int]  # None: the exact path (the transport's full_step, q* over all ids)
    max_tokens: int
    alpha: Optional[float]
    missing: str
    concurrency: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    vocab_size: Optional[int] = None
    stop: tuple[str, ...] = ()
    seed: int = 0
    record_candidates: bool = False
    temperature: float = 1.0
    alpha_method: str = "kl_symmetry"  # config.ALPHA_METHODS; alpha set: fixed
    alpha_min: float = 0.0
    alpha_max: float = 1.0


@dataclass
class StepStats:
    """What one step measured, for logging."""

    batch: int
    alpha: np.ndarray
    kl_q_theta: np.ndarray
    kl_q_target: np.ndarray
    coverage_theta: np.ndarray
    coverage_target: np.ndarray
    wait_s: float
    step_s: float


def _finite(values: np.ndarray) -> list[Optional[float]]:
    """JSON-safe floats: a non-finite value (an excluded candidate) becomes null."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


class Coordinator:
    """Drives a transport over prompts; calls `on_finished(sequence)` for each finished one."""

    def __init__(self, transport: Transport, settings: SampleSettings,
                 on_finished: Callable[[Sequence], Awaitable[None]],
                 on_step: Optional[Callable[[StepStats], None]] = None,
                 detokenize: Optional[Callable[[list[int]], Awaitable[str]]] = None) -> None:
        self.transport = transport
        self.settings = settings
        self.on_finished = on_finished
        self.on_step = on_step
        self.detokenize = detokenize
        self.wait_s = 0.0
        self.total_s = 0.0
        self.tokens_generated = 0
        self.math_s = 0.0  # the exact path's solve and draw (kernels), for benchmarks

    async def run(self, prompts: AsyncIterator[PromptItem]) -> None:
        """Generate until `prompts` is exhausted and every sequence is finished.

        A prompt's samples (`item.sample_indices`) take free slots one by one, so a group
        may span steps. On an error, `self.unfinished` lists the samples taken but not yet
        handed to `on_finished` successfully, one PromptItem per sample (so a caller can
        give them to another replica without doubling the rest of their group).
        """
        s = self.settings
        active: list[Sequence] = []
        waiting: list[tuple[PromptItem, int]] = []  # samples of the last prompt taken
        writers: dict[asyncio.Task, Sequence] = {}
        keys = itertools.count()
        exhausted = False
        start = time.perf_counter()
        self.unfinished: list[PromptItem] = []
        try:
            while True:
                while len(active) < s.concurrency and (waiting or not exhausted):
                    if not waiting:
                        try:
                            item = await anext(prompts)
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        waiting = [(item, sample) for sample in item.sample_indices]
                    item, sample = waiting.pop(0)
                    active.append(Sequence(item=item, sample_index=sample, key=next(keys),
                                           rng=sequence_rng(s.seed, item.index, sample)))
                if not active:
                    break
                finished = await self._step(active)
                if finished:
                    await self.transport.release([seq.key for seq in finished])
                for seq in finished:
                    active.remove(seq)
                    task = asyncio.create_task(self.on_finished(seq))
                    writers[task] = seq
                    task.add_done_callback(
                        lambda t: writers.pop(t, None)
                        if not t.cancelled() and t.exception() is None else None)
                self._raise_failed_writer(writers)
            await asyncio.gather(*writers)
        except BaseException:
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            failed = [seq for task, seq in writers.items() if task.cancelled() or task.exception()]
            waiting += [(seq.item, seq.sample_index) for seq in active + failed]
            self.unfinished = [replace(item, sample_indices=(sample,)) for item, sample in waiting]
            raise
        finally:
            self.total_s += time.perf_counter() - start

    @staticmethod
    def _raise_failed_writer(writers: dict[asyncio.Task, Sequence]) -> None:
        for task in writers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def _step(self, active: list[Sequence]) -> list[Sequence]:
        s = self.settings
        t0 = time.perf_counter()
        if s.top_k is None:
            return await self._finish_step(active, t0, *await self._exact(active))
        ids_theta, logp_theta, ids_target, logp_target = await self.transport.step(
            [seq.key for seq in active], [seq.context for seq in active],
            s.top_k, *self._target_contexts(active))  # each (B, k)
        t1 = time.perf_counter()
        cand = mixture.merge_topk(ids_theta, logp_theta, ids_target, logp_target,
                                  missing=s.missing, vocab_size=s.vocab_size)  # (B, M)
        alpha = mixture.choose_alpha(  # (B,)
            cand.logp_theta, cand.logp_target, "fixed" if s.alpha is not None
            else s.alpha_method, s.alpha, s.alpha_min, s.alpha_max)
        log_q = mixture.temper(mixture.log_mixture(cand.logp_theta, cand.logp_target, alpha),
                               s.temperature)  # (B, M) what the token is drawn from
        uniforms = np.array([seq.rng.random() for seq in active])  # (B,)
        choice = mixture.inverse_cdf(log_q, uniforms)  # (B,)
        rows = np.arange(len(active))
        token = cand.ids[rows, choice]  # (B,)
        diag = mixture.token_diagnostics(cand.logp_theta, cand.logp_target, log_q)
        per_token = {
            "alpha": alpha,
            "logp_theta": cand.logp_theta[rows, choice],
            "logp_target": cand.logp_target[rows, choice],
            "logp_q": log_q[rows, choice],
            "kl_q_theta": diag["kl_q_theta"],
            "kl_q_target": diag["kl_q_target"],
            "entropy_q": diag["entropy_q"],
            "coverage_theta": mixture.topk_coverage(logp_theta),
            "coverage_target": mixture.topk_coverage(logp_target),
            "in_topk_theta": (ids_theta == token[:, None]).any(axis=1),
            "in_topk_target": (ids_target == token[:, None]).any(axis=1),
        }
        candidates = None
        if s.record_candidates:
            candidates = [{
                "ids_theta": ids_theta[row].tolist(), "logp_theta": _finite(logp_theta[row]),
                "ids_target": ids_target[row].tolist(),
                "logp_target": _finite(logp_target[row])} for row in range(len(active))]
        return await self._finish_step(active, t0, t1, token, per_token, candidates)

    async def _exact(self, active: list[Sequence]) -> tuple[float, np.ndarray, dict, None]:
        """q* over the whole vocabulary: both servers' logits, solved and drawn with the
        fused engine's kernels and its counter-based uniforms (one per (seed, position)),
        so a sequence's tokens are the fused engine's at the same seed."""
        from dual_sampling.maths import kernels  # torch: the exact path only
        s = self.settings
        theta, target = await self.transport.full_step(
            [seq.key for seq in active], [seq.context for seq in active],
            *self._target_contexts(active))  # (B, V) each
        t1 = time.perf_counter()
        if theta.dtype != target.dtype:  # engines of two dtypes: float32 holds both exactly
            theta, target = theta.float(), target.float()
        rows = kernels.Rows.of(theta, target)
        n = len(active)
        solution = kernels.solve_per_row(rows, [s] * n)
        seeds = np.array([prompt_seed(s.seed, seq.item.index, seq.sample_index)
                          for seq in active], dtype=np.uint64)
        steps = np.array([len(seq.completion_ids) for seq in active], dtype=np.uint64)
        drawn = kernels.draw(rows, solution, solution.mixture(), seeds, steps,
                             np.full(n, s.temperature))
        self.math_s += time.perf_counter() - t1
        per_token = {name: drawn[name].cpu().numpy() for name in drawn if name != "token"}
        ones, true = np.ones(n), np.ones(n, dtype=bool)
        per_token.update(coverage_theta=ones, coverage_target=ones, in_topk_theta=true,
                         in_topk_target=true)
        return t1, drawn["token"].cpu().numpy(), per_token, None

    @staticmethod
    def _target_contexts(active: list[Sequence]) -> tuple[list[list[int]], ...]:
        """`(the target's contexts,)` where any sequence has a target prompt of its own,
        else `()`: transports written for one stream keep working."""
        if all(seq.item.target_prompt_ids is None for seq in active):
            return ()
        return ([seq.target_context for seq in active],)

    async def _finish_step(self, active: list[Sequence], t0: float, t1: float,
                           token: np.ndarray, per_token: dict[str, np.ndarray],
                           candidates: Optional[list[dict]]) -> list[Sequence]:
        """Append each row's token and fields, retire the finished sequences."""
        s = self.settings
        columns = {name: (values.tolist() if values.dtype == bool else _finite(values))
                   for name, values in per_token.items()}
        token_list = token.tolist()
        finished = []
        for row, seq in enumerate(active):
            seq.completion_ids.append(token_list[row])
            for name in TOKEN_FIELDS:
                seq.tokens[name].append(columns[name][row])
            if candidates is not None:
                seq.candidates.append(candidates[row])
            if token_list[row] in s.eos_token_ids:
                seq.finish_reason = "stop"
            elif (len(seq.completion_ids) >= s.max_tokens
                  or max(len(seq.context), len(seq.target_context)) >= s.max_model_len):
                seq.finish_reason = "length"
            if seq.finish_reason:
                finished.append(seq)
        if s.stop and self.detokenize is not None:
            finished += await self._stopped_by_string([q for q in active if not q.finish_reason])
        self.tokens_generated += len(active)
        self.wait_s += t1 - t0
        if self.on_step is not None:
            self.on_step(StepStats(
                batch=len(active), alpha=per_token["alpha"],
                kl_q_theta=per_token["kl_q_theta"],
                kl_q_target=per_token["kl_q_target"], coverage_theta=per_token["coverage_theta"],
                coverage_target=per_token["coverage_target"], wait_s=t1 - t0,
                step_s=time.perf_counter() - t0))
        return finished

    async def _stopped_by_string(self, running: list[Sequence]) -> list[Sequence]:
        """Sequences whose completion now contains a stop string (finish_reason "stop")."""
        texts = await asyncio.gather(*(self.detokenize(q.completion_ids) for q in running))
        stopped = [seq for seq, text in zip(running, texts)
                   if any(stop in text for stop in self.settings.stop)]
        for seq in stopped:
            seq.finish_reason = "stop"
        return stopped
