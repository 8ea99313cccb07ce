"""The scoring job's core, shared by score mode (modes/score.py) and the Python API: each
prompt's completions tokenised as generation does, checked against the servers' vocabulary
and max-model-len, batched, and scored from the actual tokens' logprobs under one or both
models (the records modes/score.py writes)."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import numpy as np

from dual_sampling.clients.actual_logprobs import (STOCK_ROUTE, Scorer, check_raw_logprobs,
                                                   choose_scorer)
from dual_sampling.clients.client import ServerInfo, VLLMClient, check_same_tokenizer
from dual_sampling.config import ScoreParams
from dual_sampling.core.sampling import tokenize_prompt
from dual_sampling.errors import DataError
from dual_sampling.files.data import ScoreItem
from dual_sampling.files.records import FieldsKey
from dual_sampling.maths import scoring

log = logging.getLogger("dual_sampling.modes.score")  # the mode's logger, as before

KEY = FieldsKey(("index", "completion_index"))
TOKENIZE_IN_FLIGHT = 32  # /tokenize requests in flight (cheap, served by the API process)


@dataclass
class Group:
    """A prompt's completions, tokenised: one scored sequence per completion."""

    item: ScoreItem
    prompt_text: Optional[str]
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    target_prompt_ids: Optional[list[int]] = None  # the target's own prompt, if any

    def prompt_of(self, model: str) -> list[int]:
        """The prompt `model` reads: the target's own where it has one, else theta's."""
        return self.target_prompt_ids if model == "target" and self.target_prompt_ids \
            is not None else self.prompt_ids

    def sequences_of(self, model: str) -> list[list[int]]:
        return [self.prompt_of(model) + ids for ids in self.completion_ids]

    @property
    def sequences(self) -> list[list[int]]:
        return self.sequences_of("theta")

    @property
    def longest(self) -> int:
        prompt = max(len(self.prompt_ids), len(self.target_prompt_ids or ()))
        return prompt + max(map(len, self.completion_ids))


async def tokenize_item(item: ScoreItem, client: VLLMClient, chat_template: bool,
                        tokenize_completion: Callable[[str], Awaitable[list[int]]],
                        target: Optional[VLLMClient] = None) -> Group:
    """Prompt and completion ids as generation has them (given ids are used as they are)."""
    prompt_text = item.prompt.get("prompt")
    if "messages" in item.prompt:
        prompt_text = json.dumps(item.prompt["messages"], ensure_ascii=False)
    prompt_ids = item.prompt_token_ids
    if prompt_ids is None:
        prompt_ids = (await tokenize_prompt(item.prompt, [client], chat_template)).prompt_ids
    completion_ids = item.completion_token_ids
    if completion_ids is None:
        completion_ids = list(await asyncio.gather(*map(tokenize_completion, item.completions)))
    target_ids = item.target_prompt_token_ids
    if target_ids is None and item.target_prompt is not None:
        if target is None:
            raise DataError(f"{item.where}: the record gives the target its own prompt, but "
                            f"no target server is set (target.url)")
        target_ids = (await tokenize_prompt({**item.target_prompt, "index": item.index},
                                            [target], chat_template)).prompt_ids
    return Group(item, prompt_text, prompt_ids, completion_ids, target_ids)


async def tokenize_items(items: list[ScoreItem], client: VLLMClient, chat_template: bool,
                         target: Optional[VLLMClient] = None) -> list[Group]:
    """Every item tokenised, TOKENIZE_IN_FLIGHT at a time; each distinct completion text is
    sent once (a label set repeats over thousands of prompts)."""
    gate = asyncio.Semaphore(TOKENIZE_IN_FLIGHT)
    completions: dict[str, asyncio.Future] = {}

    def tokenize_completion(text: str) -> asyncio.Future:
        if text not in completions:
            completions[text] = asyncio.ensure_future(
                client.tokenize(text, add_special_tokens=False))
        return completions[text]

    async def one(item: ScoreItem) -> Group:
        async with gate:
            return await tokenize_item(item, client, chat_template, tokenize_completion,
                                       target)

    return list(await asyncio.gather(*map(one, items)))


def skip_reason(group: Group, max_length: int, limit_owner: str) -> Optional[str]:
    """Why a group cannot be scored as it is, or None."""
    if not group.prompt_ids:
        return "the prompt tokenises to no tokens (nothing to condition the first token on)"
    if not all(group.completion_ids):
        return "a completion tokenises to no tokens"
    if group.longest > max_length:
        return (f"prompt + completion is {group.longest} tokens, over the {max_length} that "
                f"{limit_owner} takes; shorten it or raise the server's --max-model-len")
    return None


def check_vocab(groups: list[Group], vocab_size: Optional[int]) -> None:
    """DataError naming the record when a given token id is outside the vocabulary."""
    if vocab_size is None:
        return
    for group in groups:
        top = max(max(ids, default=0) for ids in [group.prompt_ids, *group.completion_ids])
        if top >= vocab_size:
            raise DataError(f"{group.item.where}: token id {top} is outside the servers' "
                            f"vocabulary [0, {vocab_size}): these ids come from another "
                            f"tokenizer; give texts instead, or score with matching models.")


def plan_batches(groups: list[Group], batch_size: int) -> list[list[Group]]:
    """Consecutive groups, up to `batch_size` sequences a batch; a group is never split."""
    batches: list[list[Group]] = []
    size = 0
    for group in groups:
        if not batches or size + len(group.completion_ids) > batch_size:
            batches.append([])
            size = 0
        batches[-1].append(group)
        size += len(group.completion_ids)
    return batches


def batch_records(batch: list[Group], actual: dict[str, list[np.ndarray]], per_token: bool,
                  models: dict[str, str]) -> list[dict[str, Any]]:
    """One record per (prompt, completion) of a batch from each model's actual-token
    logprobs (one `(L-1,)` array per sequence, in batch order)."""
    starts = [len(g.prompt_ids) for g in batch for _ in g.completion_ids]
    lengths = np.array([len(ids) for g in batch for ids in g.completion_ids])  # (S,)
    group_sizes = np.array([len(g.completion_ids) for g in batch])  # (G,)
    logp, sums, probs = {}, {}, {}
    for name, rows in actual.items():
        own = [len(g.prompt_of(name)) for g in batch for _ in g.completion_ids]
        logp[name] = [scoring.completion_rows(a, p) for a, p in zip(rows, own)]
        sums[name] = scoring.sequence_sums(lengths, np.concatenate(logp[name]))  # (S,)
        probs[name] = scoring.normalise_within_groups(sums[name], group_sizes)  # (S,)
    records, s = [], 0
    for group in batch:
        for c, ids in enumerate(group.completion_ids):
            record: dict[str, Any] = {
                "index": group.item.index, "completion_index": c, "prompt": group.prompt_text,
                "completion": group.item.completions[c], "num_prompt_tokens": starts[s],
                "num_tokens": int(lengths[s])}
            if group.target_prompt_ids is not None:
                record["target_prompt_token_ids"] = group.target_prompt_ids
            if per_token:
                record["prompt_token_ids"] = group.prompt_ids
                record["completion_token_ids"] = ids
                record.update({f"logp_{name}": logp[name][s].tolist() for name in actual})
            for name in actual:
                record[f"sum_logp_{name}"] = float(sums[name][s])
                record[f"mean_logp_{name}"] = float(sums[name][s] / lengths[s])
            if len(actual) == 2:
                record["log_w"] = record["sum_logp_target"] - record["sum_logp_theta"]
            if group.item.labels:
                record.update({f"label_prob_{name}": float(probs[name][s]) for name in actual})
            records.append({**record, **models})
            s += 1
    return records


async def open_scoring(clients: dict[str, VLLMClient]
                       ) -> tuple[dict[str, ServerInfo], dict[str, Any]]:
    """Each server's facts (theta and target must tokenise alike), theta pinned to the
    version it serves (no score from a theta swapped in mid-run), and the model fields every
    record carries (`theta_model`, `target_model`, `theta_version`, `theta_path`)."""
    theta = clients["theta"]
    theta.unpin_theta()  # a pin left by an earlier job would refuse /tokenize
    infos: dict[str, ServerInfo] = dict(zip(clients, await asyncio.gather(
        *(c.describe() for c in clients.values()))))
    if "target" in clients:
        await check_same_tokenizer(theta, infos["theta"], clients["target"], infos["target"])
    theta.pin_theta(infos["theta"])
    models = {f"{name}_model": info.model for name, info in infos.items()}
    return infos, {**models, **infos["theta"].theta_fields}


async def plan_groups(clients: dict[str, VLLMClient], infos: dict[str, ServerInfo],
                      items: list[ScoreItem], params: ScoreParams, chat_template: bool
                      ) -> tuple[list[Group], list[dict[str, Any]]]:
    """The items tokenised (through theta's server) and checked against the vocabulary; the
    groups that fit every server's max-model-len, and the skipped ones with their reason."""
    groups = await tokenize_items(items, clients["theta"], chat_template, clients.get("target"))
    check_vocab(groups, infos["theta"].vocab_size)
    owner = min(clients, key=lambda n: infos[n].max_model_len or 1 << 30)
    max_length = infos[owner].max_model_len or 1 << 30
    if params.route == "topk":
        max_length -= 1  # the binary route keeps one slot for the generated token
    skipped = []
    for group in groups:
        reason = skip_reason(group, max_length, f"the {owner} server at {clients[owner].url}")
        if reason is not None:
            skipped.append({"index": group.item.index, "where": group.item.where,
                            "reason": reason})
            log.warning("skipping %s: %s", group.item.where, reason)
    skipped_indices = {s["index"] for s in skipped}
    return [g for g in groups if g.item.index not in skipped_indices], skipped


async def score_groups(clients: dict[str, VLLMClient], infos: dict[str, ServerInfo],
                       groups: list[Group], params: ScoreParams, models: dict[str, Any],
                       on_records: Callable[[list[dict[str, Any]]], None]) -> dict[str, str]:
    """Score every group under each client's model: `params.batch_size` sequences a request,
    `params.concurrency` requests in flight per server, each batch's records (batch_records,
    with `models` in each) to `on_records` as it finishes. Returns each model's route."""
    longest = max((g.longest for g in groups), default=2)
    scorers: dict[str, Scorer] = {}
    routes: dict[str, str] = {}
    for name, client in clients.items():
        scorers[name], routes[name] = choose_scorer(client, infos[name], longest, params.route)
        if routes[name] == STOCK_ROUTE:
            await check_raw_logprobs(client)
        log.info("%s: scoring through %s", name, routes[name])
    in_flight = asyncio.Semaphore(params.concurrency)

    async def score(batch: list[Group]) -> None:
        async with in_flight:  # each model its own prompt (per-model prompts), same completions
            results = await asyncio.gather(*(
                scorer([s for g in batch for s in g.sequences_of(name)],
                       [len(g.prompt_of(name)) - 1 for g in batch for _ in g.completion_ids])
                for name, scorer in scorers.items()))
        on_records(batch_records(batch, dict(zip(scorers, results)), params.per_token, models))

    await asyncio.gather(*(score(b) for b in plan_batches(groups, params.batch_size)))
    return routes
