"""Score-mode throughput: this mode vs stock JSON `prompt_logprobs=1` vs transformers in-process.

Run from the repository root, with the package installed (`pip install -e .[test,cpu]`):

    python experiments/bench_score.py                          # starts theta and target servers
    python experiments/bench_score.py --theta-url http://127.0.0.1:8000 \
        --target-url http://127.0.0.1:8001

`--pairs` (prompt, completion) pairs cut from the shipped corpus at seeded offsets (prompt
about 200 characters, completion about 100), tokenised once by the theta server as the mode
does, and scored, one run each, under the tiny theta model by:
- this mode from token ids (`score.run`, the binary `/v1/topk` with k = 1);
- this mode from the texts (the server tokenises every prompt and completion first);
- this mode under theta and target at once (two servers, each pair scored by both);
- stock `/v1/completions` with `prompt_logprobs=1` (JSON), one request per pair, as many
  pairs in flight as the mode has (`--batch-size` x `--concurrency`);
- transformers in-process (float32, batches of `--batch-size` right-padded sequences);
- the engine floor: the same sequences through stock `/v1/completions` with max_tokens=1 and
  no logprobs at all (the prefill any scoring needs; it scores nothing), as many in flight.
One untimed warm-up run of the mode on both servers comes first. Tokens/s counts completion
tokens scored (pairs scored under two models count once) over the route's wall time after
start-up (no server start, no model loading). Prints a markdown
table and whether this mode is >= 5x the stock JSON route; every route's completion sums
must agree with this mode's within 1e-4.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from dual_sampling.client import VLLMClient
from dual_sampling.config import (ScoreDataConfig, ScoreParams, ScoreRunConfig, ServerConfig,
                                  WandbConfig)
from dual_sampling.data import read_score_items
from dual_sampling.launch import Servers
from dual_sampling.modes import score
from dual_sampling.records import read_records
from dual_sampling.tiny_models import corpus_path, ensure_tiny_models

TARGET_VS_STOCK, AGREEMENT = 5.0, 1e-4
WARM_UP = 128  # pairs scored once, untimed, on both servers before the runs
MODE_IDS = "this mode, token ids (`/v1/topk`, k=1, binary)"
MODE_TEXT = "this mode, texts (tokenised by the server)"
MODE_BOTH = "this mode, theta + target at once (two servers)"
STOCK = "stock `/v1/completions`, `prompt_logprobs=1` (JSON)"
FLOOR = "engine floor: stock prefill of every pair, no logprobs"
REFERENCE = "transformers in-process (float32, batched)"


def make_pairs(n: int, seed: int) -> list[dict]:
    """`n` (prompt, completion) texts from the corpus, cut at spaces, seeded."""
    text = " ".join(corpus_path().read_text(encoding="utf-8").split())
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        start = text.index(" ", rng.randrange(len(text) - 400)) + 1
        cut = text.index(" ", start + 200)
        end = text.index(" ", cut + 100)
        pairs.append({"prompt": text[start:cut], "completion": text[cut:end]})
    return pairs


async def tokenize(url: str, pairs: list[dict]) -> list[dict]:
    """Token ids by the mode's rule (score.tokenize_items), one record per pair."""
    items = read_score_items(write_jsonl(Path(tempfile.mkdtemp()) / "p.jsonl", pairs))
    async with VLLMClient(url, name="theta") as client:
        groups = await score.tokenize_items(items, client, chat_template=True)
    return [{"prompt_token_ids": g.prompt_ids, "completion_token_ids": g.completion_ids[0]}
            for g in groups]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_mode(path: Path, theta: str, target: str | None, args: argparse.Namespace
             ) -> tuple[float, int, np.ndarray]:
    """(seconds, completion tokens, sums under theta `(N,)` by index) as the mode reports them."""
    with tempfile.TemporaryDirectory() as out:
        result = score.run(ScoreRunConfig(
            output_dir=out, theta=ServerConfig(url=theta, timeout_s=600),
            target=ServerConfig(url=target, timeout_s=600), data=ScoreDataConfig(path=str(path)),
            score=ScoreParams(per_token=False, batch_size=args.batch_size,
                              concurrency=args.concurrency),
            wandb=WandbConfig(mode="disabled"), progress=False))
        records = sorted(read_records(Path(out) / score.SCORES_FILE), key=lambda r: r["index"])
    assert result["route_theta"].startswith("/v1/topk") and result["num_skipped"] == 0
    return (result["seconds"], result["tokens_this_run"],
            np.array([r["sum_logp_theta"] for r in records]))


async def run_stock(url: str, records: list[dict], in_flight: int, floor: bool = False
                    ) -> tuple[float, int, np.ndarray]:
    """One `prompt_logprobs=1` request per pair; the sum over its completion rows. `floor`:
    a plain max_tokens=1 request per pair instead, which scores nothing (sums are NaN)."""
    gate = asyncio.Semaphore(in_flight)
    async with VLLMClient(url, name="theta", timeout_s=600, max_connections=in_flight) as client:
        await client.describe()

        async def one(record: dict) -> float:
            prompt, completion = record["prompt_token_ids"], record["completion_token_ids"]
            async with gate:
                if floor:
                    await client.post("/v1/completions", {"prompt": prompt + completion,
                                                          "max_tokens": 1, "temperature": 0.0})
                    return float("nan")
                actual, _, _ = await client.prompt_logprobs(prompt + completion, 1)  # (L-1,)
            return float(actual[len(prompt) - 1:].sum())

        started = time.perf_counter()
        sums = await asyncio.gather(*(one(r) for r in records))
        seconds = time.perf_counter() - started
    return seconds, sum(len(r["completion_token_ids"]) for r in records), np.array(sums)


def run_reference(model_dir: Path, records: list[dict], batch_size: int
                  ) -> tuple[float, int, np.ndarray]:
    """Right-padded batches through the transformers model; completion sums from log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = []
    started = time.perf_counter()
    for begin in range(0, len(records), batch_size):
        batch = records[begin:begin + batch_size]
        seqs = [r["prompt_token_ids"] + r["completion_token_ids"] for r in batch]
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            logp = torch.log_softmax(logits, -1)  # (B, T, V)
        for row, record in enumerate(batch):
            p, c = len(record["prompt_token_ids"]), record["completion_token_ids"]
            positions = torch.arange(p - 1, p - 1 + len(c))  # (m,)
            sums.append(float(logp[row, positions, torch.tensor(c)].sum()))
    seconds = time.perf_counter() - started
    return seconds, sum(len(r["completion_token_ids"]) for r in records), np.array(sums)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--theta-url")
    parser.add_argument("--target-url")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = ensure_tiny_models()
    servers = None
    if not args.theta_url:
        servers = Servers(run_dir=Path(tempfile.mkdtemp(prefix="bench_score_")), models=models)
        servers.start("theta", "target")
        args.theta_url, args.target_url = servers.url("theta"), servers.url("target")
    tmp = Path(tempfile.mkdtemp(prefix="bench_score_data_"))
    try:
        pairs = make_pairs(args.pairs, args.seed)
        records = asyncio.run(tokenize(args.theta_url, pairs))
        ids_path = write_jsonl(tmp / "ids.jsonl", records)
        text_path = write_jsonl(tmp / "texts.jsonl", pairs)
        warm_up = write_jsonl(tmp / "warm_up.jsonl", records[:WARM_UP])
        run_mode(warm_up, args.theta_url, args.target_url, args)  # first shapes, imports
        routes = {
            MODE_IDS: run_mode(ids_path, args.theta_url, None, args),
            MODE_TEXT: run_mode(text_path, args.theta_url, None, args),
            MODE_BOTH: run_mode(ids_path, args.theta_url, args.target_url, args),
            STOCK: asyncio.run(run_stock(args.theta_url, records,
                                         args.batch_size * args.concurrency)),
            REFERENCE: run_reference(models["theta"], records, args.batch_size),
            FLOOR: asyncio.run(run_stock(args.theta_url, records,
                                         args.batch_size * args.concurrency, floor=True)),
        }
    finally:
        if servers is not None:
            servers.stop()

    speed = {name: tokens / seconds for name, (seconds, tokens, _) in routes.items()}
    mode_sums, mode_speed = routes[MODE_IDS][2], speed[MODE_IDS]
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in records)
    print(f"\n{args.pairs} pairs, {prompt_tokens} prompt + {routes[MODE_IDS][1]} completion "
          f"tokens, batch size {args.batch_size}, concurrency {args.concurrency}\n")
    print("| route | completion tokens | seconds | tokens/s | max abs diff of sums | "
          "this mode (ids) is |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    diffs = {}
    for name, (seconds, tokens, sums) in routes.items():
        if name != FLOOR:
            diffs[name] = float(np.abs(sums - mode_sums).max())
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(f"| {name} | {tokens} | {seconds:.2f} | {speed[name]:.0f} | {diff} | "
              f"{mode_speed / speed[name]:.2f}x |")
    checks = [(f">= {TARGET_VS_STOCK:.0f}x the stock JSON route "
               f"({mode_speed / speed[STOCK]:.2f}x)", mode_speed >= TARGET_VS_STOCK * speed[STOCK]),
              (f"sums agree within {AGREEMENT:g} ({max(diffs.values()):.1e})",
               max(diffs.values()) <= AGREEMENT)]
    print()
    for what, ok in checks:
        print(f"- {'met' if ok else 'NOT met'}: {what}")


if __name__ == "__main__":
    main()
