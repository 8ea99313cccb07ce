"""`mode=topk`: a teacher's top-k logprobs at every position, cached as shards for distillation.

    python -m dual_sampling mode=topk teacher.url=http://127.0.0.1:8000 \
        data.path=corpus.jsonl topk.k=128 output_dir=runs/topk

Inputs are texts (tokenised by the teacher's /tokenize, with its BOS) or `token_ids` lists
(dual_sampling.files.data.read_sequences), truncated to `topk.max_length` tokens or to what the
server's max-model-len allows. A sequence's id is its position in the inputs (all
`data.path` files in order, before `data.shard_index`/`num_shards` and `limit`).

The cache (layout in dual_sampling.wire.topk_format, read by dual_sampling.files.topk_dataset):
  shard-NNNNNN.safetensors  `topk.shard_size` sequences each, in the order they finished
  index.jsonl               one line per shard: its file, sequence ids (row i of the shard
                            holds sequence_ids[i]), lengths, bytes
  manifest.json             model, tokenizer facts, k, format, settings, counts, error bound
Why safetensors holding zlib-compressed sequence records: the container is a standard,
pickle-free file whose small index tensors load without touching the records, and a
sequence is read (memory-mapped slice + one decompress) without reading the rest of its
shard, so a shuffled DataLoader stays cheap; per-sequence zlib (level 1) of the wire
records takes the cache from about 3.1 bytes per top-k entry (uint16 id + int8 + per-row
floats) to about 2 on the tiny models, well within the 3-byte target, for a few ms of CPU
per long sequence, spent in a thread while requests are in flight. npz needs a whole
member decompressed per access; Parquet needs pyarrow, which the client does not depend on.

Exactly once after a kill: a shard is written to `*.tmp`, fsynced and renamed into place,
then its index line is appended (one write, fsynced). On start, `*.tmp` files are deleted,
a partial last index line is cut, shards on disk without an index line (killed between
rename and append) are indexed from their own `sequence_ids`, and every indexed sequence
is skipped. A second run on the same output_dir while one is running is refused (a lock).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import safetensors.numpy
from tabulate import tabulate
from tqdm import tqdm

from dual_sampling.clients.client import ServerInfo, VLLMClient, server_client
from dual_sampling.config import TopkRunConfig
from dual_sampling.errors import ConfigError, DataError
from dual_sampling.files import data
from dual_sampling.tracking import Tracker
from dual_sampling.wire.topk_format import (CACHE_COMPRESSION, ERROR_BOUNDS, INDEX_FILE,
                                       MANIFEST_FILE, SHARD_GLOB, VERSION, CacheShard,
                                       EncodedTopk, compress_record,
                                       id_dtype_for_vocab, read_index, shard_metadata,
                                       shard_name, shard_number)

log = logging.getLogger(__name__)
LOCK_FILE = ".topk.lock"
# Settings a resumed run may change: sequence ids are positions before `limit` applies.
RESUMABLE_CHANGES = ("shard_size", "limit")


@dataclass
class Pending:
    """Finished sequences not yet in a shard."""

    sequence_ids: list[int] = field(default_factory=list)
    input_ids: list[np.ndarray] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)


class CacheWriter:
    """Shards, index and manifest of one cache directory; exactly once across kills."""

    def __init__(self, out: Path, k: int, fmt: str, id_dtype: np.dtype,
                 manifest: dict[str, Any]) -> None:
        self.out, self.k, self.fmt, self.id_dtype = out, k, fmt, id_dtype
        self.manifest = manifest
        self.pending = Pending()
        self._flush_lock = asyncio.Lock()
        self.done: set[int] = set()
        self.positions = self.bytes = 0
        self.next_number = 1
        self._repair()

    def _repair(self) -> None:
        for tmp in self.out.glob("*.tmp"):
            tmp.unlink()
        index_path = self.out / INDEX_FILE
        if index_path.exists():
            with index_path.open("rb+") as fh:
                content = fh.read()
                fh.truncate(content.rfind(b"\n") + 1)
        entries = read_index(self.out)
        indexed = {entry["shard"] for entry in entries}
        for path in sorted(self.out.glob(SHARD_GLOB)):
            if path.name not in indexed:
                log.info("indexing %s, written before the last run stopped", path.name)
                entries.append(self._append_index(path))
        for entry in entries:
            if not (self.out / entry["shard"]).exists():
                raise DataError(f"{self.out / INDEX_FILE} lists {entry['shard']}, which is "
                                f"missing: restore it, or use a new output_dir.")
            ids = set(entry["sequence_ids"])
            if ids & self.done or len(ids) != len(entry["sequence_ids"]):
                raise DataError(f"{self.out / entry['shard']} repeats sequences of another "
                                f"shard: the cache was edited by hand; use a new output_dir.")
            self.done |= ids
            self.positions += entry["num_positions"]
            self.bytes += entry["bytes"]
            self.next_number = max(self.next_number, shard_number(entry["shard"]) + 1)
        self.num_shards = len(entries)

    def _append_index(self, path: Path) -> dict[str, Any]:
        """Append the index line of the shard at `path`, read from the shard itself."""
        shard = CacheShard(path)
        lengths = np.diff(shard.token_offsets).tolist()
        entry = {"shard": path.name, "sequence_ids": shard.sequence_ids.tolist(),
                 "lengths": lengths, "num_positions": int(sum(lengths) - len(lengths)),
                 "bytes": path.stat().st_size}
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.out / INDEX_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.write(fd, line) != len(line):
                raise DataError(f"{self.out / INDEX_FILE}: short write; is the disk full?")
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    async def add(self, sequence_ids: list[int], input_ids: list[list[int]],
                  encoded: list[EncodedTopk]) -> None:
        """Queue finished sequences; write every full shard."""
        records = await asyncio.to_thread(
            lambda: [compress_record(seq.with_id_dtype(self.id_dtype)) for seq in encoded])
        self.pending.sequence_ids += sequence_ids
        self.pending.input_ids += [np.asarray(ids, dtype=self.id_dtype) for ids in input_ids]
        self.pending.records += records
        while len(self.pending.sequence_ids) >= self.manifest["settings"]["shard_size"]:
            await self.flush(self.manifest["settings"]["shard_size"])

    async def flush(self, count: Optional[int] = None) -> None:
        """Write the first `count` pending sequences (all when None) as one shard."""
        async with self._flush_lock:
            pending = self.pending
            count = len(pending.sequence_ids) if count is None else count
            if count == 0 or len(pending.sequence_ids) < count:
                return
            taken = Pending(pending.sequence_ids[:count], pending.input_ids[:count],
                            pending.records[:count])
            del pending.sequence_ids[:count], pending.input_ids[:count], pending.records[:count]
            path = self.out / shard_name(self.next_number)
            self.next_number += 1
            entry = await asyncio.to_thread(self._write_shard, path, taken)
            self.done |= set(taken.sequence_ids)
            self.positions += entry["num_positions"]
            self.bytes += entry["bytes"]
            self.num_shards += 1
            self.write_manifest()

    def _write_shard(self, path: Path, taken: Pending) -> dict[str, Any]:
        lengths = [len(ids) for ids in taken.input_ids]
        tensors = {
            "sequence_ids": np.asarray(taken.sequence_ids, dtype=np.int64),
            "token_offsets": np.cumsum([0] + lengths, dtype=np.int64),
            "input_ids": np.concatenate(taken.input_ids).astype(self.id_dtype),
            "record_offsets": np.cumsum([0] + [len(r) for r in taken.records], dtype=np.int64),
            "records": np.frombuffer(b"".join(taken.records), dtype=np.uint8),
        }
        tmp = path.with_name(path.name + ".tmp")
        safetensors.numpy.save_file(tensors, str(tmp),
                                    metadata=shard_metadata(self.k, self.fmt, self.id_dtype))
        os.chmod(tmp, 0o644)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(self.out)
        return self._append_index(path)

    def write_manifest(self, **extra: Any) -> None:
        self.manifest.update(num_sequences=len(self.done), num_positions=self.positions,
                             num_shards=self.num_shards, bytes=self.bytes,
                             bytes_per_entry=self.bytes / max(1, self.positions * self.k),
                             **extra)
        tmp = self.out / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2))
        _fsync(tmp)
        os.replace(tmp, self.out / MANIFEST_FILE)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_inputs(config: TopkRunConfig) -> list[tuple[int, str | list[int]]]:
    """`(sequence id, text or token ids)` for this run's part of the inputs."""
    items = [item for path in config.data.path
             for item in data.read_sequences(path, config.data.text_field)]
    return data.select(list(enumerate(items)), config.data.shard_index, config.data.num_shards,
                       config.data.limit)


def check_resume(out: Path, manifest: dict[str, Any]) -> None:
    """A cache of other settings in `out` cannot be continued: name what differs."""
    path = out / MANIFEST_FILE
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if not old.get("num_sequences"):
        return  # nothing cached yet: any settings may start it
    keys = ("format_version", "model", "k", "dtype", "id_dtype", "vocab_size")
    differs = [f"{key}: {old.get(key)!r} -> {manifest[key]!r}"
               for key in keys if old.get(key) != manifest[key]]
    differs += [f"{key}: {old['settings'].get(key)!r} -> {value!r}"
                for key, value in manifest["settings"].items()
                if key not in RESUMABLE_CHANGES and old.get("settings", {}).get(key) != value]
    if differs:
        raise ConfigError(f"output_dir={out} holds a top-k cache made with other settings "
                          f"({'; '.join(differs)}): use a new output_dir, or the old settings.")


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run(config: TopkRunConfig) -> dict[str, Any]:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DataError(f"another topk run is writing to {out}: wait for it, or use "
                            f"another output_dir.") from exc
        return asyncio.run(_run(config, out))


async def _run(config: TopkRunConfig, out: Path) -> dict[str, Any]:
    params = config.topk
    inputs = load_inputs(config)
    client = server_client(config.teacher, "teacher", max_connections=params.concurrency + 8)
    async with client:
        info = await client.describe()
        max_length = (info.max_model_len - 1) if info.max_model_len else None
        if params.max_length is not None:
            max_length = min(params.max_length, max_length or params.max_length)
        # Fails here, before anything is written, when the server refuses k or the format.
        await client.prompt_topk_encoded([[0, 0]], params.k, params.dtype)
        manifest = await _manifest(config, client, info)
        check_resume(out, manifest)
        cache = CacheWriter(out, params.k, params.dtype, np.dtype(manifest["id_dtype"]), manifest)
        todo = [(index, item) for index, item in inputs if index not in cache.done]
        log.info("%d sequences, %d already cached in %s, %d to go", len(inputs),
                 len(inputs) - len(todo), out, len(todo))
        cache.write_manifest(complete=False, total_sequences=len(inputs))
        tracker = Tracker(config)
        bar = tqdm(total=len(inputs), initial=len(inputs) - len(todo), unit="seq", desc="topk",
                   disable=not config.progress, dynamic_ncols=True)
        started, positions, wire_bytes, batches_done = time.perf_counter(), 0, 0, 0

        async def tokens(item: str | list[int]) -> list[int]:
            ids = item if isinstance(item, list) else await client.tokenize(item)
            return ids[:max_length] if max_length else ids

        def on_batch(batch_size: int, encoded: list[EncodedTopk]) -> None:
            nonlocal positions, wire_bytes, batches_done
            positions += sum(seq.num_rows for seq in encoded)
            wire_bytes += sum(seq.record_size for seq in encoded)
            batches_done += 1
            bar.update(batch_size)
            tokens_per_s = positions / (time.perf_counter() - started)
            bar.set_postfix(tok_s=f"{tokens_per_s:.0f}")
            if batches_done % config.wandb.log_every == 0:
                tracker.log({
                    "topk/tokens_per_s": tokens_per_s,
                    "topk/sequences": len(cache.done) + len(cache.pending.sequence_ids),
                    "topk/wire_bytes_per_position": wire_bytes / max(1, positions),
                    "topk/disk_bytes_per_entry": cache.bytes / max(1, cache.positions * params.k),
                }, step=batches_done)

        async def worker(batches: Iterator[list[tuple[int, Any]]]) -> None:
            for batch in batches:
                input_ids = await asyncio.gather(*(tokens(item) for _, item in batch))
                encoded = await client.prompt_topk_encoded(input_ids, params.k, params.dtype)
                await cache.add([index for index, _ in batch], input_ids, encoded)
                on_batch(len(batch), encoded)

        batches = _batches(todo, params.batch_size)
        workers = [asyncio.ensure_future(worker(batches)) for _ in range(params.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            bar.close()
            await cache.flush()  # after a failure too: what finished is kept
        elapsed = time.perf_counter() - started
        summary = {
            "num_sequences": len(cache.done), "num_positions": cache.positions,
            "num_shards": cache.num_shards, "sequences_this_run": len(todo),
            "positions_this_run": positions,
            "tokens_per_s": positions / elapsed if elapsed > 0 else 0.0,
            "wire_bytes_per_position": wire_bytes / max(1, positions),
            "disk_bytes_per_entry": cache.bytes / max(1, cache.positions * params.k),
            "cache": str(out),
        }
        cache.write_manifest(complete=len(cache.done) == len(inputs))
        tracker.summary(summary)
        tracker.finish()
    print(tabulate([[key, f"{value:.4g}" if isinstance(value, float) else value]
                    for key, value in summary.items()], headers=["topk", "value"],
                   tablefmt="github"))
    return summary


async def _manifest(config: TopkRunConfig, client: VLLMClient, info: ServerInfo
                    ) -> dict[str, Any]:
    """What the cache is: model, tokenizer facts, format, the settings a resume must match."""
    models = await client.request("GET", "/v1/models")
    root = next((m.get("root") for m in models.get("data", []) if m.get("id") == info.model), None)
    probe = "Hello, world! 123"
    vocab = info.vocab_size
    return {
        "format_version": VERSION, "model": info.model, "model_root": root,
        "teacher_url": info.url, "vocab_size": vocab,
        "tokenizer": {"bos_token_id": info.bos_token_id, "eos_token_ids": list(info.eos_token_ids),
                      "probe": probe, "probe_ids": await client.tokenize(probe)},
        "k": config.topk.k, "dtype": config.topk.dtype,
        "id_dtype": id_dtype_for_vocab(vocab if vocab else 1 << 31).name,
        "compression": CACHE_COMPRESSION, "error_bound": ERROR_BOUNDS[config.topk.dtype],
        "settings": {"inputs": [str(Path(p).resolve()) for p in config.data.path],
                     "text_field": config.data.text_field, "limit": config.data.limit,
                     "shard_index": config.data.shard_index, "num_shards": config.data.num_shards,
                     "max_length": config.topk.max_length, "shard_size": config.topk.shard_size},
    }
