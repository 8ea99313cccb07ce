"""Time `/v1/topk` against stock JSON `prompt_logprobs`, and measure the cache on disk.

Run from the repository root, with the package installed (`pip install -e .`):

    python experiments/bench_topk.py                   # starts its own CPU server (tiny theta)
    python experiments/bench_topk.py --url http://127.0.0.1:8000   # a running plugin server
    python experiments/bench_topk.py --model-dir .cache/real_models/target   # the real target

Sequences of 128 tokens cut from the shipped corpus, k = 128, batches of 1, 8 and 16
sequences. /v1/topk: one request per batch, timed until the arrays are decoded (int8
logprobs dequantised to float32). Stock: one `/v1/completions` request per sequence with
`prompt_logprobs=k`, all in flight at once (what the client's fallback does), timed only
until the JSON is parsed, which favours stock. Each time is the best of `--repeats` after
one warm-up of each path. Bytes per position are the response bodies over the L-1 scored
positions. Disk: the 16 sequences' top-k written as one cache shard by the topk mode's
writer (input ids, index tensors and safetensors header included), over positions x k.
Prints a markdown table and whether the targets hold: /v1/topk at least 20x faster than
stock at every batch size, at most 3 bytes per top-k entry on disk.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from dual_sampling.clients.client import VLLMClient
from dual_sampling.models.tiny_models import corpus_path, ensure_tiny_models
from dual_sampling.modes.topk import CacheWriter
from dual_sampling.serving.launch import Servers
from dual_sampling.wire.topk_format import decode_body, id_dtype_for_vocab

BATCHES = (1, 8, 16)
TARGET_SPEEDUP, TARGET_BYTES_PER_ENTRY = 20.0, 3.0


async def best_of(repeats: int, call) -> tuple[float, int]:
    """(best seconds, bytes of the last reply) over `repeats` calls of `call()`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        size = await call()
        times.append(time.perf_counter() - started)
    return min(times), size


async def bench(url: str, k: int, length: int, repeats: int) -> tuple[list[dict], float]:
    async with VLLMClient(url, name="bench", timeout_s=600) as client:
        info = await client.describe()
        ids = await client.tokenize(corpus_path().read_text()[:60_000])
        sequences = [ids[i * length:(i + 1) * length] for i in range(max(BATCHES))]

        async def topk(batch: list[list[int]]) -> int:
            body, _ = await client.request("POST", "/v1/topk", {"sequences": batch, "k": k},
                                           want="bytes")
            [seq.decode() for seq in decode_body(body)[1]]
            return len(body)

        async def stock(batch: list[list[int]]) -> int:
            replies = await asyncio.gather(*(client.request("POST", "/v1/completions", {
                "model": info.model, "prompt": seq, "max_tokens": 1, "prompt_logprobs": k,
                "temperature": 0.0}, want="bytes") for seq in batch))
            [json.loads(body) for body, _ in replies]
            return sum(len(body) for body, _ in replies)

        await topk(sequences[:1])
        await stock(sequences[:1])
        rows = []
        for size in BATCHES:
            batch, positions = sequences[:size], size * (length - 1)
            t_topk, b_topk = await best_of(repeats, lambda: topk(batch))
            t_stock, b_stock = await best_of(repeats, lambda: stock(batch))
            rows.append({"batch": size, "topk_s": t_topk / size, "stock_s": t_stock / size,
                         "topk_bpp": b_topk / positions, "stock_bpp": b_stock / positions})
        encoded = await client.prompt_topk_encoded(sequences, k)
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter(Path(tmp), k, "int8", id_dtype_for_vocab(info.vocab_size or 1 << 31),
                             {"settings": {"shard_size": len(sequences)}})
        await writer.add(list(range(len(sequences))), sequences, encoded)
        disk = writer.bytes / (writer.positions * k)
    return rows, disk


def report(rows: list[dict], disk: float, k: int, length: int, repeats: int) -> str:
    lines = [f"L = {length} tokens, k = {k}, best of {repeats}; s/seq = seconds per sequence, "
             f"B/pos = response bytes per scored position",
             "",
             "| batch | /v1/topk s/seq | stock s/seq | speed-up | /v1/topk B/pos | stock B/pos "
             "| size ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['topk_s']:.4f} | {r['stock_s']:.4f} | "
                     f"{r['stock_s'] / r['topk_s']:.1f}x | {r['topk_bpp']:.0f} | "
                     f"{r['stock_bpp']:.0f} | {r['stock_bpp'] / r['topk_bpp']:.1f}x |")
    slowest = min(r["stock_s"] / r["topk_s"] for r in rows)
    lines += ["", f"cache on disk: {disk:.3f} bytes per top-k entry (int8, zlib-1 records)", "",
              f"target >= {TARGET_SPEEDUP:.0f}x faster than stock at every batch: "
              f"{'met' if slowest >= TARGET_SPEEDUP else 'NOT met'} (lowest {slowest:.1f}x)",
              f"target <= {TARGET_BYTES_PER_ENTRY:.0f} bytes per top-k entry on disk: "
              f"{'met' if disk <= TARGET_BYTES_PER_ENTRY else 'NOT met'} ({disk:.3f})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server with the plugin; default: start one")
    parser.add_argument("--model-dir", type=Path,
                        help="the model of a server started here (default: tiny theta; the "
                        "real target: .cache/real_models/target)")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    server = None
    if args.url is None:
        server = Servers(run_dir=Path(tempfile.mkdtemp(prefix="bench_topk_")),
                         models={"model": args.model_dir or ensure_tiny_models()["theta"]},
                         max_logprobs=max(256, args.k))
        server.start("model")
    try:
        rows, disk = asyncio.run(bench(args.url or server.url("model"), args.k, args.length,
                                       args.repeats))
    finally:
        if server is not None:
            server.stop()
    print(report(rows, disk, args.k, args.length, args.repeats))


if __name__ == "__main__":
    main()
