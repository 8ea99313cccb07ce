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
Then the label case (`--label-prompts` ICM-style prompts, each the same few-shot text then its
own claim, scored with ` True` and ` False`): this mode from token ids, where vLLM's prefix
cache serves the shared blocks, against the stock JSON route and the floor (one request per
(prompt, label); the floor's plain requests read the prefix cache too, the stock JSON ones
cannot). One untimed warm-up run of the mode on both servers comes first. Tokens/s counts completion
tokens scored (pairs scored under two models count once) over the route's wall time after
start-up (no server start, no model loading). Prints a markdown
tables and whether this mode is >= 5x the stock JSON route; every route's completion sums
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

from dual_sampling.clients.client import VLLMClient
from dual_sampling.config import (ScoreDataConfig, ScoreParams, ScoreRunConfig, ServerConfig,
                                  WandbConfig)
from dual_sampling.core import score_job
from dual_sampling.files.data import read_score_items
from dual_sampling.files.records import read_records
from dual_sampling.models.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.modes import score
from dual_sampling.serving.launch import Servers

TARGET_VS_STOCK, AGREEMENT = 5.0, 1e-4
WARM_UP = 128  # pairs scored once, untimed, on both servers before the runs
FEW_SHOT_CHARS = 900  # the label prompts' shared opening: about 350 tokens, 2 whole KV blocks
MODE_LABELS = "this mode, label sets (`/v1/topk`, k=1, binary, prefix cache)"
MODE_IDS = "this mode, token ids (`/v1/topk`, k=1, binary)"
MODE_TEXT = "this mode, texts (tokenised by the server)"
MODE_BOTH = "this mode, theta + target at once (two servers)"
STOCK = "stock `/v1/completions`, `prompt_logprobs=1` (JSON)"
FLOOR = "engine floor: stock prefill of every pair, no logprobs"
REFERENCE = "transformers in-process (float32, batched)"


def corpus_text() -> str:
    return " ".join(corpus_path().read_text(encoding="utf-8").split())


def make_pairs(n: int, seed: int) -> list[dict]:
    """`n` (prompt, completion) texts from the corpus, cut at spaces, seeded."""
    text, rng = corpus_text(), random.Random(seed)
    pairs = []
    for _ in range(n):
        start = text.index(" ", rng.randrange(len(text) - 400)) + 1
        cut = text.index(" ", start + 200)
        end = text.index(" ", cut + 100)
        pairs.append({"prompt": text[start:cut], "completion": text[cut:end]})
    return pairs


def make_label_prompts(n: int, seed: int) -> list[dict]:
    """ICM-style label sets: one shared few-shot prefix (the corpus's first FEW_SHOT_CHARS),
    a question of about 150 characters, and the labels ` True` / ` False`."""
    text, rng = corpus_text(), random.Random(seed)
    prefix = text[:FEW_SHOT_CHARS]
    prompts = []
    for _ in range(n):
        start = text.index(" ", rng.randrange(FEW_SHOT_CHARS, len(text) - 400)) + 1
        question = text[start:text.index(" ", start + 150)]
        prompts.append({"prompt": f"{prefix}\nClaim: {question}\nTrue or False? Answer:",
                        "completions": [" True", " False"]})
    return prompts


async def tokenize(url: str, records: list[dict]) -> list[score_job.Group]:
    """Token ids by the mode's rule (score_job.tokenize_items), one group per record."""
    items = read_score_items(write_jsonl(Path(tempfile.mkdtemp()) / "p.jsonl", records))
    async with VLLMClient(url, name="theta") as client:
        return await score_job.tokenize_items(items, client, chat_template=True)


def id_records(groups: list[score_job.Group]) -> list[dict]:
    """The groups as score-mode input with token ids (one completion, or a label set)."""
    return [{"prompt_token_ids": g.prompt_ids,
             "completion_token_ids": g.completion_ids if g.item.labels else g.completion_ids[0]}
            for g in groups]


def flat_pairs(groups: list[score_job.Group]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) in the order (index, completion_index)."""
    return [(g.prompt_ids, ids) for g in groups for ids in g.completion_ids]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_mode(path: Path, theta: str, target: str | None, args: argparse.Namespace
             ) -> tuple[float, int, np.ndarray]:
    """(seconds, completion tokens, sums under theta `(N,)` by (index, completion_index))."""
    with tempfile.TemporaryDirectory() as out:
        result = score.run(ScoreRunConfig(
            output_dir=out, theta=ServerConfig(url=theta, timeout_s=600),
            target=ServerConfig(url=target, timeout_s=600), data=ScoreDataConfig(path=str(path)),
            score=ScoreParams(per_token=False, batch_size=args.batch_size,
                              concurrency=args.concurrency),
            wandb=WandbConfig(mode="disabled"), progress=False))
        records = sorted(read_records(Path(out) / score.SCORES_FILE), key=score_job.KEY)
    assert result["route_theta"].startswith("/v1/topk") and result["num_skipped"] == 0
    return (result["seconds"], result["tokens_this_run"],
            np.array([r["sum_logp_theta"] for r in records]))


async def run_stock(url: str, pairs: list[tuple[list[int], list[int]]], in_flight: int,
                    floor: bool = False) -> tuple[float, int, np.ndarray]:
    """One `prompt_logprobs=1` request per pair; the sum over its completion rows. `floor`:
    a plain max_tokens=1 request per pair instead, which scores nothing (sums are NaN)."""
    gate = asyncio.Semaphore(in_flight)
    async with VLLMClient(url, name="theta", timeout_s=600, max_connections=in_flight) as client:
        await client.describe()

        async def one(prompt: list[int], completion: list[int]) -> float:
            async with gate:
                if floor:
                    await client.post("/v1/completions", {"prompt": prompt + completion,
                                                          "max_tokens": 1, "temperature": 0.0})
                    return float("nan")
                actual, _, _ = await client.prompt_logprobs(prompt + completion, 1)  # (L-1,)
            return float(actual[len(prompt) - 1:].sum())

        started = time.perf_counter()
        sums = await asyncio.gather(*(one(*pair) for pair in pairs))
        seconds = time.perf_counter() - started
    return seconds, sum(len(c) for _, c in pairs), np.array(sums)


def run_reference(model_dir: Path, pairs: list[tuple[list[int], list[int]]], batch_size: int
                  ) -> tuple[float, int, np.ndarray]:
    """Right-padded batches through the transformers model; completion sums from log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = []
    started = time.perf_counter()
    for begin in range(0, len(pairs), batch_size):
        batch = pairs[begin:begin + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, (prompt, completion) in enumerate(batch):
            ids[row, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[row, :len(prompt) + len(completion)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            logp = torch.log_softmax(logits, -1)  # (B, T, V)
        for row, (prompt, completion) in enumerate(batch):
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))  # (m,)
            sums.append(float(logp[row, positions, torch.tensor(completion)].sum()))
    seconds = time.perf_counter() - started
    return seconds, sum(len(c) for _, c in pairs), np.array(sums)


def print_table(title: str, routes: dict[str, tuple[float, int, np.ndarray]], mode: str
                ) -> dict[str, float]:
    """The markdown table of `routes` against `mode`; returns each route's max abs diff of
    sums from the mode's (the floor scores nothing and has none)."""
    speed = {name: tokens / seconds for name, (seconds, tokens, _) in routes.items()}
    print(f"\n{title}\n")
    print(f"| route | completion tokens | seconds | tokens/s | max abs diff of sums | "
          f"{mode.split(' (')[0]} is |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    diffs = {}
    for name, (seconds, tokens, sums) in routes.items():
        if name != FLOOR:
            diffs[name] = float(np.abs(sums - routes[mode][2]).max())
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(f"| {name} | {tokens} | {seconds:.2f} | {speed[name]:.0f} | {diff} | "
              f"{speed[mode] / speed[name]:.2f}x |")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--theta-url")
    parser.add_argument("--target-url")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--label-prompts", type=int, default=500)
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
    in_flight = args.batch_size * args.concurrency
    try:
        texts = make_pairs(args.pairs, args.seed)
        groups = asyncio.run(tokenize(args.theta_url, texts))
        pairs = flat_pairs(groups)
        ids_path = write_jsonl(tmp / "ids.jsonl", id_records(groups))
        text_path = write_jsonl(tmp / "texts.jsonl", texts)
        warm_up = write_jsonl(tmp / "warm_up.jsonl", id_records(groups[:WARM_UP]))
        run_mode(warm_up, args.theta_url, args.target_url, args)  # first shapes, imports
        routes = {
            MODE_IDS: run_mode(ids_path, args.theta_url, None, args),
            MODE_TEXT: run_mode(text_path, args.theta_url, None, args),
            MODE_BOTH: run_mode(ids_path, args.theta_url, args.target_url, args),
            STOCK: asyncio.run(run_stock(args.theta_url, pairs, in_flight)),
            REFERENCE: run_reference(models["theta"], pairs, args.batch_size),
            FLOOR: asyncio.run(run_stock(args.theta_url, pairs, in_flight, floor=True)),
        }
        label_groups = asyncio.run(tokenize(args.theta_url,
                                            make_label_prompts(args.label_prompts, args.seed)))
        label_pairs = flat_pairs(label_groups)
        labels_path = write_jsonl(tmp / "labels.jsonl", id_records(label_groups))
        label_routes = {
            MODE_LABELS: run_mode(labels_path, args.theta_url, None, args),
            STOCK: asyncio.run(run_stock(args.theta_url, label_pairs, in_flight)),
            FLOOR: asyncio.run(run_stock(args.theta_url, label_pairs, in_flight, floor=True)),
        }
    finally:
        if servers is not None:
            servers.stop()

    prompt_tokens = sum(len(p) for p, _ in pairs)
    diffs = print_table(f"{args.pairs} pairs, {prompt_tokens} prompt + {routes[MODE_IDS][1]} "
                        f"completion tokens, batch size {args.batch_size}, concurrency "
                        f"{args.concurrency}", routes, MODE_IDS)
    label_tokens = sum(len(p) for p, _ in label_pairs) // 2
    label_diffs = print_table(
        f"label case: {args.label_prompts} prompts ({label_tokens} tokens, each opening with "
        f"the same {FEW_SHOT_CHARS}-character few-shot text) x [' True', ' False']",
        label_routes, MODE_LABELS)
    speed = {name: tokens / seconds for name, (seconds, tokens, _) in routes.items()}
    label_speed = {name: tokens / seconds for name, (seconds, tokens, _) in label_routes.items()}
    worst = max(*diffs.values(), *label_diffs.values())
    checks = [(f">= {TARGET_VS_STOCK:.0f}x the stock JSON route on pairs "
               f"({speed[MODE_IDS] / speed[STOCK]:.2f}x)",
               speed[MODE_IDS] >= TARGET_VS_STOCK * speed[STOCK]),
              (f">= {TARGET_VS_STOCK:.0f}x the stock JSON route on label sets "
               f"({label_speed[MODE_LABELS] / label_speed[STOCK]:.2f}x)",
               label_speed[MODE_LABELS] >= TARGET_VS_STOCK * label_speed[STOCK]),
              (f"sums agree within {AGREEMENT:g} ({worst:.1e})", worst <= AGREEMENT)]
    print()
    for what, ok in checks:
        print(f"- {'met' if ok else 'NOT met'}: {what}")


if __name__ == "__main__":
    main()
