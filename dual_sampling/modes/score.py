"""`mode=score`: logprobs of given completions under theta and, optionally, the target.

    python -m dual_sampling mode=score theta.url=http://127.0.0.1:8000 \
        [target.url=http://127.0.0.1:8001] data.path=pairs.jsonl output_dir=runs/score

Input (data.read_score_items): per record a prompt (text, chat `messages` or
`prompt_token_ids`) and one `completion`, a list `completions` (the label case), or
`completion_token_ids`; samples.jsonl of sample mode is read as it is. Tokenised as
generation does: prompt = tokenize(prompt) with the server's special tokens (BOS), or the chat
template for `messages`; completion = tokenize(completion) without special tokens; the
sequence is the two id lists concatenated, so the completion's first token is conditioned on
the whole prompt and never merges with the prompt's last.

Each request carries up to `score.batch_size` sequences, a prompt's completions together;
`score.concurrency` requests per server are in flight, and with a target each batch goes to
both servers at once. Scores come from the actual tokens' logprobs only
(dual_sampling.clients.actual_logprobs: the binary `/v1/topk` with k = 1, or stock `prompt_logprobs=0`).
The binary route is told each sequence's first completion row (`rows_from`), so vLLM's prefix
cache serves prompts shared within a request (a label set) or across requests (a few-shot
opening), in whole KV blocks.

Before any scoring request: unreadable records (DataError naming file:line), servers that do
not answer or tokenise differently (ServerError / ServerMismatchError), token ids outside the
vocabulary (DataError). A record whose longest sequence does not fit the server's
max-model-len is skipped and named in the summary, never truncated.

Writes `output_dir/scores.jsonl`, one record per (index, completion_index), resumable exactly
once, and `output_dir/summary.json` (also printed, and in W&B).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dual_sampling.clients.client import VLLMClient, server_client
from dual_sampling.config import ScoreParams, ScoreRunConfig, ServerConfig
from dual_sampling.core.score_job import (KEY, TOKENIZE_IN_FLIGHT, open_scoring, plan_groups,
                                          score_groups)
from dual_sampling.files import data
from dual_sampling.files.records import ResumableJsonlWriter, read_records
from dual_sampling.files.run_files import format_summary, theta_summary
from dual_sampling.maths import mixture
from dual_sampling.tracking import Tracker

log = logging.getLogger(__name__)
SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_ROWS = 32


def summarize(path: Path, names: list[str]) -> dict[str, Any]:
    """Over every record in the scores file: counts, mean NLL per model, log_w and its ESS."""
    records = list(read_records(path))
    if not records:
        return {"num_records": 0}
    tokens = int(sum(r["num_tokens"] for r in records))
    summary: dict[str, Any] = {"num_records": len(records),
                               "num_prompts": len({r["index"] for r in records}),
                               "num_tokens": tokens, **theta_summary(records)}
    for name in names:
        summary[f"mean_nll_{name}"] = -sum(r[f"sum_logp_{name}"] for r in records) / tokens
    if len(names) == 2:
        log_w = np.array([r["log_w"] for r in records])  # (N,)
        summary["mean_log_w"] = float(log_w.mean())
        summary["ess_fraction"] = float(mixture.effective_sample_size(log_w)) / len(records)
    return summary


def run(config: ScoreRunConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


def _client(server: ServerConfig, name: str, params: ScoreParams) -> VLLMClient:
    return server_client(server, name, max_connections=params.concurrency * params.batch_size
                         + TOKENIZE_IN_FLIGHT)


async def _run(config: ScoreRunConfig) -> dict[str, Any]:
    params = config.score
    items = data.read_score_items(config.data.path, config.data.prompt_field)
    items = data.select(items, config.data.shard_index, config.data.num_shards,
                        config.data.limit)
    out = Path(config.output_dir)
    servers = {"theta": config.theta, **({"target": config.target} if config.target else {})}
    clients = {name: _client(server, name, params) for name, server in servers.items()}
    async with AsyncExitStack() as stack:
        for client in clients.values():
            await stack.enter_async_context(client)
        infos, models = await open_scoring(clients)
        writer = ResumableJsonlWriter(out / SCORES_FILE, key=KEY)
        todo = [item for item in items if any((item.index, c) not in writer.done
                                              for c in range(len(item.completions)))]
        log.info("%d records, %d to score", len(items), len(todo))
        tracker = Tracker(config)
        started = time.perf_counter()
        groups, skipped = await plan_groups(clients, infos, todo, params,
                                            config.data.chat_template)
        tokenize_s = time.perf_counter() - started
        bar = tqdm(total=sum(len(g.completion_ids) for g in groups), unit="seq", desc="score",
                   disable=not config.progress, dynamic_ncols=True)
        counters = {"tokens": 0, "sequences": 0}
        table: list[dict[str, Any]] = []
        scoring_started = time.perf_counter()

        def on_records(records: list[dict[str, Any]]) -> None:
            for record in records:
                if KEY(record) not in writer.done:
                    writer.write(record)
                    counters["tokens"] += record["num_tokens"]
                    counters["sequences"] += 1
                    if len(table) < TABLE_ROWS:
                        table.append(record)
            bar.update(len(records))

        try:
            routes = await score_groups(clients, infos, groups, params, models, on_records)
        finally:
            writer.close()
            bar.close()
        scoring_s = time.perf_counter() - scoring_started
        elapsed = time.perf_counter() - started
        summary = summarize(out / SCORES_FILE, list(clients))
        summary.update({
            "sequences_this_run": counters["sequences"], "tokens_this_run": counters["tokens"],
            "tokens_per_s": counters["tokens"] / elapsed if elapsed > 0 else 0.0,
            "scoring_tokens_per_s": counters["tokens"] / scoring_s if scoring_s > 0 else 0.0,
            "tokenize_s": tokenize_s, "seconds": elapsed,
            **{f"route_{name}": route for name, route in routes.items()},
            "num_skipped": len(skipped), "dataset": str(out / SCORES_FILE)})
        (out / SUMMARY_FILE).write_text(json.dumps({**summary, "skipped": skipped}, indent=2))
        columns = ["index", "completion_index", "num_tokens",
                   *(f"sum_logp_{name}" for name in clients),
                   *(["log_w"] if len(clients) == 2 else [])]
        tracker.table("scores", columns, [[r[c] for c in columns] for r in table])
        tracker.summary(summary)
        tracker.finish()
    print(format_summary(summary))
    return {**summary, "skipped": skipped}
