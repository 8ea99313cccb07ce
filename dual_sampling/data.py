"""Input files: prompts for sample mode, texts or token-id sequences for topk and perplexity.

Accepted: JSONL (one object a line) or plain text (one item a non-empty line). Every
problem raises DataError naming the file and line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, TypeVar

from dual_sampling.errors import DataError

T = TypeVar("T")


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc}); each line of a "
                                f".jsonl file must be one JSON object.") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            rows.append((number, row))
    return rows


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist: check the `data.*` path.")
    return path


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> list[dict[str, Any]]:
    """Prompts as `{"index": i, "prompt": str}` or `{"index": i, "messages": [...]}`.

    JSONL records need `prompt_field` (a string) or `messages` (a chat list); a text file
    gives one prompt a non-empty line. Raises DataError on an empty file or a bad record.
    """
    path = _check_file(path)
    prompts: list[dict[str, Any]] = []
    if path.suffix in (".jsonl", ".json"):
        for number, row in _jsonl(path):
            if isinstance(row.get(prompt_field), str) and row[prompt_field]:
                prompts.append({"index": len(prompts), "prompt": row[prompt_field]})
            elif isinstance(row.get("messages"), list) and row["messages"]:
                prompts.append({"index": len(prompts), "messages": row["messages"]})
            else:
                raise DataError(f"{path}:{number}: no non-empty `{prompt_field}` string and no "
                                f"`messages` list; set `data.prompt_field` to the right key.")
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [{"index": i, "prompt": line} for i, line in
                   enumerate(line for line in lines if line.strip())]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts: give a file with at least one.")
    return prompts


def read_sequences(path: str | Path, text_field: str = "text") -> list[str | list[int]]:
    """Texts (`text_field`) or token-id lists (`token_ids`) from JSONL, or text lines."""
    path = _check_file(path)
    items: list[str | list[int]] = []
    if path.suffix in (".jsonl", ".json"):
        for number, row in _jsonl(path):
            if isinstance(row.get("token_ids"), list) and row["token_ids"]:
                items.append([int(t) for t in row["token_ids"]])
            elif isinstance(row.get(text_field), str) and row[text_field]:
                items.append(row[text_field])
            else:
                raise DataError(f"{path}:{number}: no non-empty `{text_field}` or `token_ids`.")
    else:
        items = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise DataError(f"input file {path} is empty: give a file with at least one sequence.")
    return items


def read_corpus(path: str | Path) -> str:
    """A whole text file as one string (perplexity corpora)."""
    path = _check_file(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"corpus {path} is empty: give a text file with content.")
    return text


def shard(items: Sequence[T], shard_index: int, num_shards: int) -> list[T]:
    """Every `num_shards`-th item from `shard_index`: shards are disjoint and cover all."""
    return list(items[shard_index::num_shards])
