"""A PyTorch `Dataset` over a top-k cache written by `mode=topk`, shaped for a distillation loss.

    from dual_sampling.files.topk_dataset import TopkDataset
    ds = TopkDataset("runs/topk")
    item = ds[0]  # input_ids (L,), topk_ids (L-1, k), topk_logprobs (L-1, k),
                  # actual_logprobs (L-1,), sequence_id

Items are ordered by sequence id (position in the run's inputs). Only shards listed in the
index are read; a run killed after writing a shard indexes it when started again. Each
item reads and decompresses one sequence record; shards are opened lazily, once per
process (DataLoader workers each open their own).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dual_sampling.errors import DataError
from dual_sampling.wire.topk_format import MANIFEST_FILE, CacheShard, read_index


class TopkDataset(Dataset):
    """Per sequence: `input_ids (L,)` long, `topk_ids (L-1, k)` long, `topk_logprobs (L-1, k)`
    float32 (nats, dequantised), `actual_logprobs (L-1,)` float32, `sequence_id` int."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        manifest_path = self.cache_dir / MANIFEST_FILE
        if not manifest_path.exists():
            raise DataError(f"{self.cache_dir} holds no {MANIFEST_FILE}: not a top-k cache; "
                            f"write one with `python -m dual_sampling mode=topk output_dir=...`.")
        self.manifest = json.loads(manifest_path.read_text())
        self.k = int(self.manifest["k"])
        entries = read_index(self.cache_dir)
        self.shard_names = [entry["shard"] for entry in entries]
        sequence_ids = np.array([i for e in entries for i in e["sequence_ids"]], dtype=np.int64)
        shards = np.array([s for s, e in enumerate(entries) for _ in e["sequence_ids"]],
                          dtype=np.int64)
        rows = np.array([r for e in entries for r in range(len(e["sequence_ids"]))],
                        dtype=np.int64)
        order = np.argsort(sequence_ids, kind="stable")
        self.sequence_ids, self._shard, self._row = sequence_ids[order], shards[order], rows[order]
        self._open: dict[int, CacheShard] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.sequence_ids.shape[0])

    def _shard_at(self, number: int) -> CacheShard:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._open, self._pid = {}, os.getpid()
        if number not in self._open:
            self._open[number] = CacheShard(self.cache_dir / self.shard_names[number])
        return self._open[number]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        shard, row = self._shard_at(int(self._shard[index])), int(self._row[index])
        topk = shard.record(row).decode()
        return {
            "sequence_id": int(self.sequence_ids[index]),
            "input_ids": torch.from_numpy(shard.input_ids(row).astype(np.int64)),  # (L,)
            "topk_ids": torch.from_numpy(topk.ids),  # (L-1, k)
            "topk_logprobs": torch.from_numpy(topk.logp),  # (L-1, k)
            "actual_logprobs": torch.from_numpy(np.array(topk.actual)),  # (L-1,)
        }
