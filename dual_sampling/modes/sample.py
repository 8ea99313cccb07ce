"""`mode=sample`: dual sampling into an RLHF dataset, `output_dir/samples.jsonl`.

    python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
        target.url=http://127.0.0.1:8001 data.prompts=prompts.jsonl output_dir=runs/x

    python -m dual_sampling mode=sample theta.url=http://127.0.0.1:8000 \
        sample.transport=fused data.prompts=prompts.jsonl output_dir=runs/x  # --fused server

Each role also takes a list of replicas of its model (`theta.url=[u1,u2]`): prompts are
spread over replica pairs (fused: replicas) and restart on another when theirs fails.

Before the first token every server must answer and agree on the tokenizer, and (request,
session) allow top_k logprobs. With `sample.transport=fused` (or `auto` finding a fused
server at theta.url) theta.url is the fused server, target.url is not used, and each token
comes from the exact full-vocabulary q* (dual_sampling/transports/fused.py).

Each prompt gets `sample.n` completions, one record per (index, sample_index). A run
started again with the same output_dir skips the samples already written. The summary
(all records in the file) goes to `output_dir/summary.json`, W&B and stdout; with n > 1 the
group weights go to `output_dir/groups.jsonl` (dual_sampling/groups.py), and with
`sample.report=true` the plots to `output_dir/report.html` (dual_sampling/report.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from dual_sampling import data, groups, report, sample_stats
from dual_sampling.client import ServerInfo, VLLMClient, check_same_tokenizer
from dual_sampling.config import SampleParams, SampleRunConfig, ServerConfig
from dual_sampling.coordinator import (Coordinator, PromptItem, PromptQueue, SampleSettings,
                                       Sequence, StepStats)
from dual_sampling.errors import ConfigError, ServerError, ServerMismatchError
from dual_sampling.session_format import PATH as SESSION_PATH
from dual_sampling.records import FieldsKey, ResumableJsonlWriter, read_records
from dual_sampling.tracking import Tracker
from dual_sampling.transports.fused import FusedCoordinator, FusedSettings
from dual_sampling.transports.request import RequestTransport
from dual_sampling.transports.session import SessionTransport

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
GROUPS_FILE = "groups.jsonl"
# files written before groups have no sample_index: each of their records is sample 0
SAMPLE_KEY = FieldsKey(("index", "sample_index"), defaults=(("sample_index", 0),))


def make_clients(server: ServerConfig, name: str, concurrency: int) -> list[VLLMClient]:
    """One client per replica URL; replicas are named `theta[0]`, `theta[1]`, ..."""
    urls = server.urls
    return [VLLMClient(url, name=name if len(urls) == 1 else f"{name}[{i}]", model=server.model,
                       timeout_s=server.timeout_s, max_retries=server.max_retries,
                       max_connections=2 * concurrency + 8) for i, url in enumerate(urls)]


async def preflight(thetas: list[VLLMClient], targets: list[VLLMClient], top_k: Optional[int]
                    ) -> list[ServerInfo]:
    """Every server answers, all share theta[0]'s tokenizer and allow top_k (unless None);
    else a clear error. Returns each server's info in the order of `thetas + targets`."""
    clients = thetas + targets
    infos = await asyncio.gather(*(c.describe() for c in clients))
    for client, info in zip(clients[1:], infos[1:]):
        await check_same_tokenizer(clients[0], infos[0], client, info)
    if top_k is not None:
        await asyncio.gather(*(c.check_top_k(top_k) for c in clients))
    if not infos[0].eos_token_ids:
        log.warning("theta server at %s names no EOS id: sequences end at max_tokens only",
                    clients[0].url)
    return infos


def sequence_record(seq: Sequence, completion: str, run_fields: dict[str, Any]
                    ) -> dict[str, Any]:
    """One dataset row: the prompt, the completion, per-token and per-sequence values, and
    `run_fields` (model names, temperature)."""
    tokens = seq.tokens
    sums = {name: _sum(tokens[name]) for name in ("logp_theta", "logp_target", "logp_q")}
    record = {
        "index": seq.item.index, "sample_index": seq.sample_index,
        "prompt": seq.item.prompt, "completion": completion,
        "prompt_token_ids": seq.item.prompt_ids, "completion_token_ids": seq.completion_ids,
        "finish_reason": seq.finish_reason, "num_tokens": len(seq.completion_ids),
        **tokens,
        "sum_logp_theta": sums["logp_theta"], "sum_logp_target": sums["logp_target"],
        "sum_logp_q": sums["logp_q"],
        "log_w_theta": _diff(sums["logp_theta"], sums["logp_q"]),
        "log_w_target": _diff(sums["logp_target"], sums["logp_q"]),
        "mean_alpha": float(np.mean(tokens["alpha"])),
        **run_fields,
    }
    if seq.candidates:
        record["candidates"] = seq.candidates
    return record


def _sum(values: list[Optional[float]]) -> Optional[float]:
    """Sum of log-probabilities; null (a -inf term) makes the sum null."""
    return None if any(v is None for v in values) else float(sum(values))


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def wants_fused(params: SampleParams, theta_infos: list[ServerInfo]) -> bool:
    """True for the fused transport: asked for, or `auto` and theta.url serves the fused model.

    Raises ServerMismatchError when the servers do not fit the transport asked for, and
    ConfigError for `sample.top_k` with fused (it has no meaning there)."""
    fused = [info.fused for info in theta_infos]
    urls = [info.url for info in theta_infos]
    if any(fused) and not all(fused):
        raise ServerMismatchError(
            f"theta.url mixes fused and plain servers ({dict(zip(urls, fused))}): give the "
            f"replicas of one kind.")
    if params.transport == "fused" and not all(fused):
        raise ServerMismatchError(
            f"sample.transport=fused, but {urls} serve(s) one model: start a fused server with "
            f"./start_vllm.sh --fused --theta A --target B and point theta.url at it.")
    if params.transport in ("request", "session") and all(fused):
        raise ServerMismatchError(
            f"theta.url {urls} is a fused server (both models in one engine): use "
            f"sample.transport=fused (or auto), or two plain servers for {params.transport}.")
    use = all(fused)
    if use and params.top_k is not None:
        raise ConfigError(
            f"config key `sample.top_k` = {params.top_k} has no meaning with the fused "
            f"transport (q* covers the full vocabulary): remove it.")
    return use


def choose_transport(transport: str, infos: list[ServerInfo]) -> bool:
    """True for the session transport: asked for, or `auto` and every server has the route."""
    if transport == "request":
        return False
    has = [info.serves(SESSION_PATH) for info in infos]
    if transport == "session" and not all(has):
        missing = [info.url for info, ok in zip(infos, has) if not ok]
        raise ServerMismatchError(
            f"sample.transport=session, but the server(s) {missing} have no session route: "
            f"start them with start_vllm.sh (it loads this package's vLLM plugin) or use "
            f"sample.transport=request.")
    log.info("transport: %s", "session" if all(has) else "request")
    return all(has)


async def tokenize_prompt(prompt: dict[str, Any], clients: list[VLLMClient],
                          chat_template: bool) -> PromptItem:
    """Token ids of a prompt record, from the first theta replica that answers."""
    error: Optional[ServerError] = None
    for client in clients:
        try:
            if "messages" not in prompt:
                text, ids = prompt["prompt"], await client.tokenize(prompt["prompt"])
            elif chat_template:
                text = json.dumps(prompt["messages"], ensure_ascii=False)
                ids = await client.tokenize_chat(prompt["messages"])
            else:
                text = "\n".join(m.get("content", "") for m in prompt["messages"])
                ids = await client.tokenize(text)
            return PromptItem(prompt["index"], text, ids,
                              tuple(prompt.get("sample_indices", (0,))))
        except ServerError as exc:
            error = exc
    raise error  # type: ignore[misc]


async def generate(pairs: list[tuple[VLLMClient, ...]], queue: PromptQueue,
                   make_coordinator: Callable[..., Coordinator]) -> list[Coordinator]:
    """Run one coordinator per replica pair (fused: per replica) over the shared queue.

    A pair pulls prompts as its slots free up, so the least-loaded pair takes the next
    one, and a sample stays on its pair until it finishes. When a pair fails (a server
    error after retries), its unfinished samples (not those of their groups already
    written) go back in the queue and restart, from their first token, on the pairs still
    alive; with none left the error is raised.
    """
    alive, done = list(pairs), []
    while True:
        coordinators = [make_coordinator(*pair) for pair in alive]
        results = await asyncio.gather(*(c.run(queue) for c in coordinators),
                                       return_exceptions=True)
        await asyncio.gather(*(c.transport.aclose() for c in coordinators),
                             return_exceptions=True)
        done += coordinators
        failed = []
        for pair, coordinator, result in zip(alive, coordinators, results):
            if isinstance(result, ServerError):
                queue.requeue(coordinator.unfinished)
                failed.append((pair, result))
                log.warning("replica %s failed (%s); %d prompts restart on the others",
                            " + ".join(c.url for c in pair), result,
                            len(coordinator.unfinished))
            elif isinstance(result, BaseException):
                raise result
        alive = [pair for pair in alive if pair not in [p for p, _ in failed]]
        if queue.empty:
            return done
        if not alive:
            raise failed[-1][1]


def run(config: SampleRunConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


async def _run(config: SampleRunConfig) -> dict[str, Any]:
    params = config.sample
    prompts = data.read_prompts(config.data.prompts, config.data.prompt_field)
    prompts = data.select(prompts, config.data.shard_index, config.data.num_shards,
                          config.data.limit)
    out = Path(config.output_dir)
    thetas = make_clients(config.theta, "theta", params.concurrency)
    async with AsyncExitStack() as stack:
        for client in thetas:
            await stack.enter_async_context(client)
        fused = wants_fused(params, list(await asyncio.gather(*(c.describe() for c in thetas))))
        targets = [] if fused else make_clients(config.target, "target", params.concurrency)
        for client in targets:
            await stack.enter_async_context(client)
        infos = await preflight(thetas, targets, None if fused else params.k)
        info_theta = infos[0]
        info_target = info_theta if fused else infos[len(thetas)]
        if fused:
            transport = "fused"
            pairs: list[tuple[VLLMClient, ...]] = [(theta,) for theta in thetas]
            log.info("transport: fused (both models in the engine at %s; target.url unused)",
                     [c.url for c in thetas])
        else:
            transport = "session" if choose_transport(params.transport, infos) else "request"
            pairs = [(thetas[i % len(thetas)], targets[i % len(targets)])
                     for i in range(max(len(thetas), len(targets)))]
        max_model_len = min(info_theta.max_model_len or 1 << 30, info_target.max_model_len or 1 << 30)
        writer = ResumableJsonlWriter(out / SAMPLES_FILE, key=SAMPLE_KEY)
        todo = [{**p, "sample_indices": missing} for p in prompts if (missing := [
            s for s in range(params.n) if (p["index"], s) not in writer.done])]
        total, remaining = len(prompts) * params.n, sum(len(p["sample_indices"]) for p in todo)
        log.info("%d prompts x n=%d samples, %d already in %s, %d to go on %d replica "
                 "pair(s)", len(prompts), params.n, total - remaining, out / SAMPLES_FILE,
                 remaining, len(pairs))
        tracker = Tracker(config)
        bar = tqdm(total=total, initial=total - remaining, unit="sample",
                   desc="sample", disable=not config.progress, dynamic_ncols=True)
        run_fields = {"temperature": params.temperature, **(
            {"theta_model": f"{info_theta.model}[theta]",
             "target_model": f"{info_theta.model}[target]"} if fused else
            {"theta_model": info_theta.model, "target_model": info_target.model})}
        settings = SampleSettings(
            top_k=params.k, max_tokens=params.max_tokens, alpha=params.alpha,
            missing=params.missing, concurrency=params.concurrency,
            eos_token_ids=info_theta.eos_token_ids, max_model_len=max_model_len,
            vocab_size=info_theta.vocab_size, stop=tuple(params.stop), seed=config.seed,
            record_candidates=params.record_candidates, temperature=params.temperature)
        table_rows: list[list[Any]] = []
        started = time.perf_counter()
        counters = {"steps": 0, "tokens": 0}

        def tokens_per_s() -> float:
            return counters["tokens"] / max(time.perf_counter() - started, 1e-9)

        def on_step(stats: StepStats) -> None:
            counters["steps"] += 1
            counters["tokens"] += stats.batch
            if counters["steps"] % config.wandb.log_every == 0:
                tracker.log({
                    "step/alpha_mean": float(stats.alpha.mean()),
                    "step/alpha": tracker.histogram(stats.alpha),
                    "step/kl_q_theta": float(np.nanmean(stats.kl_q_theta)),
                    "step/kl_q_target": float(np.nanmean(stats.kl_q_target)),
                    "step/coverage_theta": float(stats.coverage_theta.mean()),
                    "step/coverage_target": float(stats.coverage_target.mean()),
                    "step/batch": stats.batch,
                    "step/tokens_per_s": tokens_per_s(),
                }, step=counters["steps"])

        def make_coordinator(theta: VLLMClient, target: Optional[VLLMClient] = None
                             ) -> Coordinator | FusedCoordinator:
            async def on_finished(seq: Sequence) -> None:
                completion = await theta.detokenize(seq.completion_ids)
                writer.write(sequence_record(seq, completion, run_fields))
                if len(table_rows) < 32:
                    table_rows.append([seq.item.index, seq.sample_index, seq.item.prompt,
                                       completion, float(np.mean(seq.tokens["alpha"])),
                                       seq.finish_reason])
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens_per_s():.0f}")

            if fused:
                return FusedCoordinator(theta, FusedSettings(
                    max_tokens=params.max_tokens, alpha=params.alpha,
                    concurrency=params.concurrency, max_model_len=max_model_len,
                    temperature=params.temperature, stop=tuple(params.stop), seed=config.seed),
                    on_finished, on_step=on_step)
            per_token = (SessionTransport(theta, target, timeout_s=config.theta.timeout_s,
                                          max_retries=config.theta.max_retries)
                         if transport == "session" else RequestTransport(theta, target))
            return Coordinator(per_token, settings, on_finished, on_step=on_step,
                               detokenize=theta.detokenize)

        queue = PromptQueue(todo, partial(tokenize_prompt, clients=thetas,
                                          chat_template=config.data.chat_template),
                            lookahead=2 * params.concurrency)
        try:
            coordinators = await generate(pairs, queue, make_coordinator)
        finally:
            writer.close()
            bar.close()
        elapsed = time.perf_counter() - started
        wait_s = sum(c.wait_s for c in coordinators)
        total_s = sum(c.total_s for c in coordinators)
        records = list(read_records(out / SAMPLES_FILE))
        summary = sample_stats.summarize(records, params.n)
        if params.n > 1:
            groups.write_groups(out / GROUPS_FILE, groups.group_weights(records, params.n))
        summary.update({
            "top_k": None if fused else params.k, "n": params.n,
            "temperature": params.temperature,
            "tokens_this_run": counters["tokens"],
            "tokens_per_s": counters["tokens"] / elapsed if elapsed > 0 else 0.0,
            "server_wait_fraction": wait_s / total_s if total_s > 0 else 0.0,
            "replica_pairs": len(pairs),
            "transport": transport,
            "dataset": str(out / SAMPLES_FILE),
        })
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        tracker.table("samples", ["index", "sample_index", "prompt", "completion", "mean_alpha",
                                  "finish_reason"], table_rows)
        if params.report:
            figures = report.write_report([out], out)
            tracker.images({f"report/{path.stem}": path for path in figures})
        tracker.summary(summary)
        tracker.finish()
    print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    rows = [[key, f"{value:.4g}" if isinstance(value, float) else value]
            for key, value in summary.items()]
    return tabulate(rows, headers=["summary", "value"], tablefmt="github")

