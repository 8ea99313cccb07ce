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
comes from the exact full-vocabulary q* (dual_sampling/core/transports/fused.py).

Each prompt gets `sample.n` completions, one record per (index, sample_index). A run
started again with the same output_dir skips the samples already written. The summary
(all records in the file) goes to `output_dir/summary.json`, W&B and stdout; with n > 1 the
group weights go to `output_dir/groups.jsonl` (dual_sampling/maths/groups.py), and with
`sample.report=true` the plots to `output_dir/report.html` (dual_sampling/report.py).
`output_dir/shard.json` says which prompts the run covers, for `python -m
dual_sampling.merge` to join the jobs of a sharded sweep into one dataset.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from dual_sampling import report
from dual_sampling.config import SampleRunConfig
from dual_sampling.core.coordinator import StepStats
from dual_sampling.core.sampling import Sampling, make_clients
from dual_sampling.errors import ConfigError
from dual_sampling.files import data
from dual_sampling.files.records import ResumableJsonlWriter, read_records
from dual_sampling.files.run_files import (GROUPS_FILE, RUN_PARAMS_FILE, SAMPLE_KEY, SAMPLES_FILE,
                                          SHARD_FILE, SUMMARY_FILE, format_summary,
                                          theta_summary)
from dual_sampling.maths import sample_stats
from dual_sampling.maths import groups
from dual_sampling.tracking import Tracker

log = logging.getLogger(__name__)
# the settings that decide which tokens a sample gets: a resumed run must keep them
TOKEN_SHAPING = ("alpha", "alpha_method", "alpha_min", "alpha_max", "temperature", "top_k",
                 "missing", "max_tokens", "stop")
# what run_params.json files written before a key existed meant by its absence
ABSENT_MEANS = {"sample.alpha_method": "kl_symmetry", "sample.alpha_min": 0.0,
                "sample.alpha_max": 1.0}
TABLE_COLUMNS = ("index", "sample_index", "prompt", "completion", "mean_alpha", "finish_reason")


def check_resume(out: Path, config: SampleRunConfig, transport: str,
                 models: dict[str, dict[str, Any]], exact: Optional[bool] = None) -> None:
    """Record in `out/run_params.json` what decides the distribution of a run's samples: the
    token settings, the transport that ran (fused: exact q*; session/request: q* over the
    merged top-k) and each model's identity (`Sampling.models`: name, checkpoint path and
    fingerprint). When `out` already holds them, refuse (ConfigError naming each change) a
    run that changes any: its samples would come from another distribution than those it
    resumes. A theta that a server loaded on purpose (load_theta: `theta_version` > 0) is
    accepted and added to the list of policies; records name theirs (theta_version)."""
    wanted = {"seed": config.seed,
              **{f"sample.{name}": getattr(config.sample, name) for name in TOKEN_SHAPING}}
    wanted = json.loads(json.dumps(wanted))  # lists and None as JSON gives them back
    path = out / RUN_PARAMS_FILE
    found = json.loads(path.read_text()) if path.is_file() else {}
    changed = [f"{key}={found.get(key, ABSENT_MEANS.get(key))!r} there, {value!r} now"
               for key, value in wanted.items()
               if found and found.get(key, ABSENT_MEANS.get(key)) != value]
    exact = transport == "fused" if exact is None else exact
    if found.get("transport", transport) != transport:
        changed.append(f"transport {found['transport']!r} there, {transport!r} now (fused "
                       f"samples the exact q*, request q* over the merged top-k, session "
                       f"either)")
    elif found and found.get("exact", found.get("transport") == "fused") != exact:
        was = found.get("exact", found.get("transport") == "fused")
        changed.append(f"{'exact' if was else 'merged top-k'} q* there, "
                       f"{'exact' if exact else 'merged top-k'} now (sample.top_k unset on "
                       f"the session transport is exact since 2026-12; give "
                       f"sample.top_k=20 to resume a top-k run)")
    target = found.get("target")
    if target is not None and not same_model(target, models["target"]):
        changed.append(f"target {describe_model(target)} there, "
                       f"{describe_model(models['target'])} now")
    thetas = found.get("theta", [])
    theta = models["theta"]
    if thetas and not any(same_model(t, theta) for t in thetas):
        if theta.get("theta_version"):
            log.warning("theta is %s, loaded by load_theta (theta_version %s): the records of "
                        "this run name it", describe_model(theta), theta["theta_version"])
        else:
            changed.append(f"theta {describe_model(thetas[-1])} there, "
                           f"{describe_model(theta)} now (a server started on another "
                           f"checkpoint; load_theta into the running server is how a run "
                           f"moves on to a new policy)")
    if changed:
        raise ConfigError(
            f"output_dir {out} holds samples drawn with other settings or models ("
            + "; ".join(changed) + f"): resuming would mix two distributions in one "
            f"dataset. Give a new output_dir, or the settings and servers the run started "
            f"with ({path} lists them).")
    if not any(same_model(t, theta) for t in thetas):
        thetas = [*thetas, theta]
    out.mkdir(parents=True, exist_ok=True)
    record = {**wanted, "transport": transport, "exact": exact, "target": models["target"],
              "theta": thetas}
    path.write_text(json.dumps(record, indent=2) + "\n")


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """One checkpoint: equal fingerprints, or (a server that reports none) equal paths."""
    if a.get("fingerprint") and b.get("fingerprint"):
        return a["fingerprint"] == b["fingerprint"]
    return a.get("path") == b.get("path")


def describe_model(model: dict[str, Any]) -> str:
    return f"{model.get('path') or model.get('model')} ({model.get('fingerprint') or 'no fingerprint'})"


def write_shard(out: Path, config: SampleRunConfig, num_prompts: int) -> None:
    """Write `out/shard.json`: the prompts file (absolute path), its number of prompts
    before sharding, `data.shard_index`, `num_shards`, `limit` and `sample.n`. The prompt
    indices this run covers are not stored: a prompt's `index` is its position in the file,
    so they are `data.select(range(num_prompts), shard_index, num_shards, limit)`. Every run
    rewrites it, so a resume with a greater n records that n (dual_sampling/merge.py); a run
    of another shard than the one `out` holds is refused (ConfigError naming the keys)."""
    shard = {"prompts": str(Path(config.data.prompts).resolve()), "num_prompts": num_prompts,
             "shard_index": config.data.shard_index, "num_shards": config.data.num_shards,
             "limit": config.data.limit, "n": config.sample.n}
    path = out / SHARD_FILE
    found = json.loads(path.read_text()) if path.is_file() else {}
    if changed := [f"data.{key}={found[key]!r} there, {shard[key]!r} now"
                   for key in ("shard_index", "num_shards") if found.get(key, shard[key]) != shard[key]]:
        raise ConfigError(f"output_dir {out} holds another shard's samples ({'; '.join(changed)}): "
                          f"resuming would mix two shards in one job. Give this shard's "
                          f"output_dir, or the shard the run started with.")
    path.write_text(json.dumps(shard, indent=2) + "\n")


def run(config: SampleRunConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


async def _run(config: SampleRunConfig) -> dict[str, Any]:
    params = config.sample
    prompts = data.read_prompts(
        config.data.prompts, config.data.prompt_field,
        theta_template=config.data.theta_template, target_template=config.data.target_template,
        theta_chat=config.data.theta_chat, target_chat=config.data.target_chat,
        fields=config.data.fields.as_dict())
    num_prompts = len(prompts)
    prompts = data.select(prompts, config.data.shard_index, config.data.num_shards,
                          config.data.limit)
    out = Path(config.output_dir)
    write_shard(out, config, num_prompts)
    thetas = make_clients(config.theta, "theta", params.concurrency)
    targets = make_clients(config.target, "target", params.concurrency)
    async with AsyncExitStack() as stack:
        for client in thetas + targets:  # opening makes no connection
            await stack.enter_async_context(client)
        sampling = await Sampling.open(thetas, targets, params, seed=config.seed,
                                       timeout_s=config.theta.timeout_s,
                                       max_retries=config.theta.max_retries)
        check_resume(out, config, sampling.transport, sampling.models, exact=sampling.exact)
        writer = ResumableJsonlWriter(out / SAMPLES_FILE, key=SAMPLE_KEY)
        todo = [{**p, "sample_indices": missing} for p in prompts if (missing := [
            s for s in range(params.n) if (p["index"], s) not in writer.done])]
        total, remaining = len(prompts) * params.n, sum(len(p["sample_indices"]) for p in todo)
        log.info("%d prompts x n=%d samples, %d already in %s, %d to go on %d replica "
                 "pair(s) (theta_version %s)", len(prompts), params.n, total - remaining,
                 out / SAMPLES_FILE, remaining, len(sampling.pairs), sampling.theta_versions)
        tracker = Tracker(config)
        bar = tqdm(total=total, initial=total - remaining, unit="sample",
                   desc="sample", disable=not config.progress, dynamic_ncols=True)
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

        def on_record(record: dict[str, Any]) -> None:
            writer.write(record)
            if len(table_rows) < 32:
                table_rows.append([record[c] for c in TABLE_COLUMNS])
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens_per_s():.0f}")

        try:
            coordinators = await sampling.run(todo, on_record,
                                              chat_template=config.data.chat_template,
                                              on_step=on_step)
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
            "top_k": None if sampling.exact else params.k, "exact": sampling.exact,
            "n": params.n,
            "temperature": params.temperature, "alpha_method": params.rule,
            "alpha_min": params.alpha_min, "alpha_max": params.alpha_max,
            "tokens_this_run": counters["tokens"],
            "tokens_per_s": counters["tokens"] / elapsed if elapsed > 0 else 0.0,
            "server_wait_fraction": wait_s / total_s if total_s > 0 else 0.0,
            "replica_pairs": len(sampling.pairs),
            "transport": sampling.transport,
            **theta_summary(records),
            "dataset": str(out / SAMPLES_FILE),
        })
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        tracker.table("samples", list(TABLE_COLUMNS), table_rows)
        if params.report:
            figures = report.write_report([out], out)
            tracker.images({f"report/{path.stem}": path for path in figures})
        tracker.summary(summary)
        tracker.finish()
    print(format_summary(summary))
    return summary


