"""`mode=sample`: dual sampling into an RLHF dataset, `output_dir/samples.jsonl`.

    python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
        target.url=http://127.0.0.1:8001 data.prompts=prompts.jsonl output_dir=runs/x

Before the first token both servers must answer, agree on the tokenizer and allow top_k
logprobs. A run started again with the same output_dir skips the prompts already written.
The summary (all records in the file) goes to `output_dir/summary.json`, W&B and stdout.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from dual_sampling import data, mixture
from dual_sampling.client import ServerInfo, VLLMClient, check_same_tokenizer
from dual_sampling.config import SampleRunConfig, ServerConfig
from dual_sampling.coordinator import (Coordinator, PromptItem, RequestTransport,
                                       SampleSettings, Sequence, StepStats)
from dual_sampling.records import ResumableJsonlWriter, read_records
from dual_sampling.tracking import Tracker

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


def make_client(server: ServerConfig, name: str, concurrency: int) -> VLLMClient:
    return VLLMClient(server.url, name=name, model=server.model, timeout_s=server.timeout_s,
                      max_retries=server.max_retries, max_connections=2 * concurrency + 8)


async def preflight(theta: VLLMClient, target: VLLMClient, top_k: int
                    ) -> tuple[ServerInfo, ServerInfo]:
    """Both servers answer, share a tokenizer and allow top_k; else a clear error."""
    info_theta, info_target = await asyncio.gather(theta.describe(), target.describe())
    await check_same_tokenizer(theta, info_theta, target, info_target)
    await asyncio.gather(theta.check_top_k(top_k), target.check_top_k(top_k))
    if not info_theta.eos_token_ids:
        log.warning("theta server at %s names no EOS id: sequences end at max_tokens only",
                    theta.url)
    return info_theta, info_target


def sequence_record(seq: Sequence, completion: str, models: dict[str, str]) -> dict[str, Any]:
    """One dataset row: the prompt, the completion, per-token and per-sequence values."""
    tokens = seq.tokens
    sums = {name: _sum(tokens[name]) for name in ("logp_theta", "logp_target", "logp_q")}
    record = {
        "index": seq.item.index, "prompt": seq.item.prompt, "completion": completion,
        "prompt_token_ids": seq.item.prompt_ids, "completion_token_ids": seq.completion_ids,
        "finish_reason": seq.finish_reason, "num_tokens": len(seq.completion_ids),
        **tokens,
        "sum_logp_theta": sums["logp_theta"], "sum_logp_target": sums["logp_target"],
        "sum_logp_q": sums["logp_q"],
        "log_w_theta": _diff(sums["logp_theta"], sums["logp_q"]),
        "log_w_target": _diff(sums["logp_target"], sums["logp_q"]),
        "mean_alpha": float(np.mean(tokens["alpha"])),
        **models,
    }
    if seq.candidates:
        record["candidates"] = seq.candidates
    return record


def _sum(values: list[Optional[float]]) -> Optional[float]:
    """Sum of log-probabilities; null (a -inf term) makes the sum null."""
    return None if any(v is None for v in values) else float(sum(values))


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def summarize(path: Path) -> dict[str, Any]:
    """Run summary over every record in the dataset file."""
    records = list(read_records(path))
    if not records:
        return {"num_sequences": 0}

    def column(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for r in records for v in r[name]])

    def log_w(name: str) -> np.ndarray:
        return np.array([-np.inf if r[name] is None else r[name] for r in records])

    n = len(records)
    ess_theta = float(mixture.effective_sample_size(log_w("log_w_theta")))
    ess_target = float(mixture.effective_sample_size(log_w("log_w_target")))
    return {
        "num_sequences": n,
        "num_tokens": int(sum(r["num_tokens"] for r in records)),
        "mean_alpha": float(np.nanmean(column("alpha"))),
        "mean_kl_q_theta": float(np.nanmean(column("kl_q_theta"))),
        "mean_kl_q_target": float(np.nanmean(column("kl_q_target"))),
        "mean_coverage_theta": float(np.nanmean(column("coverage_theta"))),
        "mean_coverage_target": float(np.nanmean(column("coverage_target"))),
        "ess_theta": ess_theta, "ess_theta_fraction": ess_theta / n,
        "ess_target": ess_target, "ess_target_fraction": ess_target / n,
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in records)
                           for k in sorted({r["finish_reason"] for r in records})},
    }


async def _tokenized_prompts(prompts: list[dict[str, Any]], client: VLLMClient,
                             chat_template: bool, lookahead: int) -> AsyncIterator[PromptItem]:
    """Tokenise prompts `lookahead` at a time, ahead of the coordinator's demand."""
    async def tokenize(p: dict[str, Any]) -> PromptItem:
        if "messages" in p:
            if not chat_template:
                text = "\n".join(m.get("content", "") for m in p["messages"])
                return PromptItem(p["index"], text, await client.tokenize(text))
            return PromptItem(p["index"], json.dumps(p["messages"], ensure_ascii=False),
                              await client.tokenize_chat(p["messages"]))
        return PromptItem(p["index"], p["prompt"], await client.tokenize(p["prompt"]))

    for start in range(0, len(prompts), lookahead):
        for item in await asyncio.gather(*(tokenize(p) for p in prompts[start:start + lookahead])):
            yield item


def run(config: SampleRunConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


async def _run(config: SampleRunConfig) -> dict[str, Any]:
    params = config.sample
    prompts = data.read_prompts(config.data.prompts, config.data.prompt_field)
    prompts = data.shard(prompts, config.data.shard_index, config.data.num_shards)
    if config.data.limit is not None:
        prompts = prompts[:config.data.limit]
    out = Path(config.output_dir)
    theta = make_client(config.theta, "theta", params.concurrency)
    target = make_client(config.target, "target", params.concurrency)
    async with theta, target:
        info_theta, info_target = await preflight(theta, target, params.top_k)
        max_model_len = min(info_theta.max_model_len or 1 << 30, info_target.max_model_len or 1 << 30)
        writer = ResumableJsonlWriter(out / SAMPLES_FILE)
        todo = [p for p in prompts if p["index"] not in writer.done]
        log.info("%d prompts, %d already in %s, %d to go", len(prompts),
                 len(prompts) - len(todo), out / SAMPLES_FILE, len(todo))
        tracker = Tracker(config)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
                   desc="sample", disable=not config.progress, dynamic_ncols=True)
        models = {"theta_model": info_theta.model, "target_model": info_target.model}
        settings = SampleSettings(
            top_k=params.top_k, max_tokens=params.max_tokens, alpha=params.alpha,
            missing=params.missing, concurrency=params.concurrency,
            eos_token_ids=info_theta.eos_token_ids, max_model_len=max_model_len,
            vocab_size=info_theta.vocab_size, stop=tuple(params.stop), seed=config.seed,
            record_candidates=params.record_candidates)
        table_rows: list[list[Any]] = []
        started = time.perf_counter()
        steps = 0

        async def on_finished(seq: Sequence) -> None:
            completion = await theta.detokenize(seq.completion_ids)
            writer.write(sequence_record(seq, completion, models))
            if len(table_rows) < 32:
                table_rows.append([seq.item.index, seq.item.prompt, completion,
                                   float(np.mean(seq.tokens["alpha"])), seq.finish_reason])
            bar.update(1)
            bar.set_postfix(tok_s=f"{coordinator.tokens_generated / (time.perf_counter() - started):.0f}")

        def on_step(stats: StepStats) -> None:
            nonlocal steps
            steps += 1
            if steps % config.wandb.log_every == 0:
                tracker.log({
                    "step/alpha_mean": float(stats.alpha.mean()),
                    "step/alpha": tracker.histogram(stats.alpha),
                    "step/kl_q_theta": float(np.nanmean(stats.kl_q_theta)),
                    "step/kl_q_target": float(np.nanmean(stats.kl_q_target)),
                    "step/coverage_theta": float(stats.coverage_theta.mean()),
                    "step/coverage_target": float(stats.coverage_target.mean()),
                    "step/batch": stats.batch,
                    "step/tokens_per_s": coordinator.tokens_generated / (time.perf_counter() - started),
                }, step=steps)

        coordinator = Coordinator(RequestTransport(theta, target), settings, on_finished,
                                  on_step=on_step, detokenize=theta.detokenize)
        try:
            await coordinator.run(_tokenized_prompts(todo, theta, config.data.chat_template,
                                                     lookahead=2 * params.concurrency))
        finally:
            writer.close()
            bar.close()
        elapsed = time.perf_counter() - started
        summary = summarize(out / SAMPLES_FILE)
        summary.update({
            "tokens_this_run": coordinator.tokens_generated,
            "tokens_per_s": coordinator.tokens_generated / elapsed if elapsed > 0 else 0.0,
            "server_wait_fraction": coordinator.wait_s / coordinator.total_s
            if coordinator.total_s > 0 else 0.0,
            "dataset": str(out / SAMPLES_FILE),
        })
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        tracker.table("samples", ["index", "prompt", "completion", "mean_alpha", "finish_reason"],
                      table_rows)
        tracker.summary(summary)
        tracker.finish()
    print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    rows = [[key, f"{value:.4g}" if isinstance(value, float) else value]
            for key, value in summary.items()]
    return tabulate(rows, headers=["summary", "value"], tablefmt="github")

