"""The Python API for training loops: sample, score and swap theta without Hydra.

    from dual_sampling import DualSampler

    async with DualSampler("http://127.0.0.1:8000") as sampler:     # a fused server
        records = await sampler.sample(prompts, n=4, max_tokens=64)  # samples.jsonl rows
        scores = await sampler.score(prompts, completions)           # scores.jsonl rows
        await sampler.load_theta("ckpt/round-1")                     # the next round's policy

    with SyncDualSampler("http://127.0.0.1:8000") as sampler:       # the same, blocking
        records = sampler.sample(prompts, n=4)

Same semantics as the modes, which are built on the same code: `sample` runs
`dual_sampling.core.sampling.Sampling` (transport `auto`: fused when theta_url serves both
models, else session/request with `target_url`), `score` runs modes/score.py's
`plan_groups` + `score_groups`. Records are the dicts the modes write, one per (prompt,
sample) in input order, each with the `theta_version`/`theta_path` that produced it.
Nothing is written to disk.

Seeds: `sample(..., seed=s)` gives the same tokens for the same weights, prompts and s
whatever the batching; without `seed` the k-th call of a sampler uses `seed + k`, so rounds
of a loop draw fresh samples and a rerun of the loop draws the same ones.

`load_theta(path)` swaps every theta replica's weights in place (vllm_plugin/theta_route.py)
and returns each server's `{"theta_version", "theta_path", "load_s"}`; a checkpoint that does
not fit raises CheckpointRefusedError and the servers keep the weights they had.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from contextlib import AsyncExitStack
from typing import Any, Optional, Sequence

from dual_sampling.clients.client import ServerInfo, VLLMClient
from dual_sampling.config import (PromptDataConfig, RunConfig, SampleParams, ScoreParams,
                                  ServerConfig)
from dual_sampling.core.sampling import Sampling
from dual_sampling.core.score_job import KEY as SCORE_KEY
from dual_sampling.core.score_job import open_scoring, plan_groups, score_groups
from dual_sampling.errors import ConfigError
from dual_sampling.files import data

Prompt = str | dict[str, Any]  # a text, or {"messages": [...]} (or {"prompt": text})
# the command line's defaults: the API takes every default from these
_SAMPLE, _SCORE, _SERVER = SampleParams(), ScoreParams(), ServerConfig()


def _urls(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _prompt_row(prompt: Prompt, where: str) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict) and ("prompt" in prompt or "messages" in prompt):
        return dict(prompt)
    raise ConfigError(f"{where}: a prompt is a string or a dict with `prompt` or `messages`, "
                      f"not {type(prompt).__name__}")


class DualSampler:
    """Async sampler over running servers; see the module docstring.

    theta_url: the theta server (or a fused server), or a list of replicas.
    target_url: the target server(s); not needed with a fused theta_url.
    transport, top_k, missing, concurrency: as `sample.*` in conf/ (config.SampleParams).
    chat_template: render `{"messages": ...}` prompts with the served chat template
    (`data.chat_template`); false joins the messages' contents with newlines.
    Every default is the command line's (`config.py`'s dataclasses are the one source;
    tests/test_api.py holds them equal).
    api_key: the servers' API key (start_vllm.sh --api-key), sent as `Authorization: Bearer`;
    None reads the environment variable VLLM_API_KEY (unset or empty: no key sent).
    """

    def __init__(self, theta_url: str | Sequence[str],
                 target_url: str | Sequence[str] | None = None, *,
                 transport: str = _SAMPLE.transport,
                 top_k: Optional[int] = _SAMPLE.top_k, missing: str = _SAMPLE.missing,
                 concurrency: int = _SAMPLE.concurrency, seed: int = RunConfig.seed,
                 chat_template: bool = PromptDataConfig.chat_template,
                 timeout_s: float = _SERVER.timeout_s, max_retries: int = _SERVER.max_retries,
                 api_key: Optional[str] = None) -> None:
        self.theta_urls, self.target_urls = _urls(theta_url), _urls(target_url)
        if not self.theta_urls:
            raise ConfigError("DualSampler: `theta_url` is empty: give the theta (or fused) "
                              "server's URL")
        self.defaults = SampleParams(top_k=top_k, missing=missing, concurrency=concurrency,
                                     transport=transport, report=False)
        self.defaults.check("DualSampler")
        self.seed, self.chat_template = seed, chat_template
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self._api_key = api_key or os.environ.get("VLLM_API_KEY") or None
        self.calls = 0
        self._stack: Optional[AsyncExitStack] = None
        self.thetas: list[VLLMClient] = []
        self.targets: list[VLLMClient] = []

    async def __aenter__(self) -> "DualSampler":
        def client(url: str, name: str, urls: list[str], i: int) -> VLLMClient:
            return VLLMClient(url, name=name if len(urls) == 1 else f"{name}[{i}]",
                              timeout_s=self.timeout_s, max_retries=self.max_retries,
                              max_connections=2 * self.defaults.concurrency + 8,
                              api_key=self._api_key,
                              api_key_hint="pass it as DualSampler(api_key=...) or set the "
                                           "environment variable VLLM_API_KEY")

        self._stack = AsyncExitStack()
        self.thetas = [client(u, "theta", self.theta_urls, i)
                       for i, u in enumerate(self.theta_urls)]
        self.targets = [client(u, "target", self.target_urls, i)
                        for i, u in enumerate(self.target_urls)]
        for c in self.thetas + self.targets:
            await self._stack.enter_async_context(c)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

    def _check_open(self) -> None:
        if self._stack is None:
            raise RuntimeError("use `async with DualSampler(...) as sampler:` (or "
                               "SyncDualSampler in `with`) before calling it")

    async def sample(self, prompts: Sequence[Prompt], *, n: int = _SAMPLE.n,
                     max_tokens: int = _SAMPLE.max_tokens,
                     temperature: float = _SAMPLE.temperature,
                     alpha: Optional[float] = _SAMPLE.alpha, stop: Sequence[str] = (),
                     seed: Optional[int] = None, alpha_method: str = _SAMPLE.alpha_method,
                     alpha_min: float = _SAMPLE.alpha_min, alpha_max: float = _SAMPLE.alpha_max
                     ) -> list[dict[str, Any]]:
        """n completions per prompt from q*; the samples.jsonl rows, ordered by (index,
        sample_index). `alpha`: None solves alpha* per token, a number fixes it;
        `alpha_method`, `alpha_min`, `alpha_max`: as `sample.*` (config.SampleParams)."""
        self._check_open()
        params = dataclasses.replace(self.defaults, n=n, max_tokens=max_tokens,
                                     temperature=temperature, alpha=alpha, stop=list(stop),
                                     alpha_method=alpha_method, alpha_min=alpha_min,
                                     alpha_max=alpha_max)
        params.check("sample")
        if seed is None:
            seed = self.seed + self.calls
        self.calls += 1
        rows = [{**_prompt_row(p, f"sample() prompt {i}"), "index": i,
                 "sample_indices": tuple(range(n))} for i, p in enumerate(prompts)]
        sampling = await Sampling.open(self.thetas, self.targets, params, seed=seed,
                                       timeout_s=self.timeout_s, max_retries=self.max_retries)
        records: list[dict[str, Any]] = []
        await sampling.run(rows, records.append, chat_template=self.chat_template)
        return sorted(records, key=lambda r: (r["index"], r["sample_index"]))

    async def score(self, prompts: Sequence[Prompt],
                    completions: Sequence[str | Sequence[str]], *,
                    per_token: bool = _SCORE.per_token, batch_size: int = _SCORE.batch_size,
                    concurrency: int = _SCORE.concurrency) -> list[dict[str, Any]]:
        """Logprobs of `completions[i]` after `prompts[i]` under theta (and the target when
        target_url is given); a list of strings for one prompt is a label set. Returns the
        scores.jsonl rows, ordered by (index, completion_index)."""
        self._check_open()
        if len(prompts) != len(completions):
            raise ConfigError(f"score(): {len(prompts)} prompts but {len(completions)} "
                              f"completions: give one completion (or list) per prompt")
        params = ScoreParams(per_token=per_token, batch_size=batch_size,
                             concurrency=concurrency)
        params.check("score")
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            row = _prompt_row(prompt, f"score() prompt {i}")
            row["completion" if isinstance(completion, str) else "completions"] = (
                completion if isinstance(completion, str) else list(completion))
            items.append(data.score_item(f"score() item {i}", i, row, "prompt"))
        clients = {"theta": self.thetas[0], **({"target": self.targets[0]}
                                              if self.targets else {})}
        infos, models = await open_scoring(clients)
        groups, skipped = await plan_groups(clients, infos, items, params, self.chat_template)
        if skipped:
            raise ConfigError(f"score(): {len(skipped)} item(s) cannot be scored: "
                              + "; ".join(f"item {s['index']}: {s['reason']}" for s in skipped))
        records: list[dict[str, Any]] = []
        await score_groups(clients, infos, groups, params, models, records.extend)
        return sorted(records, key=SCORE_KEY)

    async def load_theta(self, path: str) -> list[dict[str, Any]]:
        """Load the checkpoint at `path` (a directory on the servers' machine) into every
        theta replica; each server's `{"theta_version", "theta_path", "load_s"}`."""
        self._check_open()
        return list(await asyncio.gather(*(c.load_theta(path) for c in self.thetas)))

    async def describe(self) -> list[ServerInfo]:
        """Each theta replica's facts (its theta_version and theta_path among them)."""
        self._check_open()
        return list(await asyncio.gather(*(c.describe() for c in self.thetas)))


class SyncDualSampler:
    """DualSampler for code without an event loop: the same methods, blocking.

    Use in `with`; it runs its own event loop (not from inside a running one: there, use
    DualSampler with `async with`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sampler = DualSampler(*args, **kwargs)
        self._runner: Optional[asyncio.Runner] = None

    def __enter__(self) -> "SyncDualSampler":
        self._runner = asyncio.Runner()
        self._runner.run(self.sampler.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._runner is not None:
            self._runner.run(self.sampler.__aexit__(*exc))
            self._runner.close()
            self._runner = None

    def _run(self, coroutine: Any) -> Any:
        if self._runner is None:
            coroutine.close()
            raise RuntimeError("use `with SyncDualSampler(...) as sampler:` before calling it")
        return self._runner.run(coroutine)

    def sample(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return self._run(self.sampler.sample(*args, **kwargs))

    def score(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return self._run(self.sampler.score(*args, **kwargs))

    def load_theta(self, path: str) -> list[dict[str, Any]]:
        return self._run(self.sampler.load_theta(path))

    def describe(self) -> list[ServerInfo]:
        return self._run(self.sampler.describe())
