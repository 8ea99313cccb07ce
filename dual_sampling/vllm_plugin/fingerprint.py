"""A checkpoint's identity: what a sample run records so that a resume cannot switch models.

    fingerprint("/ckpt/policy")  # "sha256:3f9c..." (16 hex digits), or None (not a directory)

The digest covers every file that decides the model's outputs: `config.json`,
`generation_config.json` and the tokenizer files in full; for each weight file
(`*.safetensors`, `*.bin`, `*.pt`) its name, its size, its first MiB (the safetensors header
with every tensor's name, shape and offset, and the first weights) and 32 blocks of 4 KiB at
evenly spaced offsets. A fine-tuned checkpoint changes every tensor, so any of those blocks
tells it apart; reading about 1.2 MiB per weight file keeps it cheap on a 140 GB
checkpoint (a full hash would take minutes). Two checkpoints with equal fingerprints can in
principle differ only in bytes no block samples: a resume check, not a signature.

A hub id that is not a local directory is looked up in the local Hugging Face cache
(`snapshot_download(local_files_only=True)`); when it is not there the result is None and
the run records the model's name and path alone.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

FULL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
HEAD_BYTES = 1 << 20
BLOCKS, BLOCK_BYTES = 32, 4096
DIGITS = 16


def _local_dir(path: str) -> Optional[Path]:
    directory = Path(path)
    if directory.is_dir():
        return directory
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # not a hub id, or not in the local cache: no fingerprint
        return None


def _weights_digest(file: Path, digest: "hashlib._Hash") -> None:
    size = file.stat().st_size
    digest.update(f"{file.name}:{size}\n".encode())
    with file.open("rb") as handle:
        digest.update(handle.read(HEAD_BYTES))
        for i in range(BLOCKS):
            handle.seek(size * i // BLOCKS)
            digest.update(handle.read(BLOCK_BYTES))


@functools.lru_cache(maxsize=16)
def _cached(directory: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    root = Path(directory)
    for name, _, _ in stamp:
        file = root / name
        if name.endswith(WEIGHT_SUFFIXES):
            _weights_digest(file, digest)
        else:
            digest.update(f"{name}\n".encode() + file.read_bytes())
    return f"sha256:{digest.hexdigest()[:DIGITS]}"


def fingerprint(path: str) -> Optional[str]:
    """The checkpoint at `path` (a directory or a cached hub id) as `sha256:<16 hex>`, or
    None when no local files are found. Cached per directory until a file's size or
    modification time changes."""
    directory = _local_dir(path)
    if directory is None:
        return None
    files = sorted(f for f in directory.iterdir() if f.is_file()
                   and (f.name in FULL_FILES or f.name.endswith(WEIGHT_SUFFIXES)))
    if not files:
        return None
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _cached(str(directory.resolve()), stamp)
