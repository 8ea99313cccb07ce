"""Whether a checkpoint can replace the served theta's weights in place (load_theta).

A running engine built its theta from one config: its layer shapes, KV-cache layout, rope
and vocabulary are fixed. A new checkpoint fits only if it would build the same module
tree, so `problems(new, served)` compares, before any weight is touched:

- the directory: it exists and holds a `config.json` and safetensors weights (what
  `save_pretrained` writes; sharded files with their index included);
- the config: every key equal to the served checkpoint's, except those that do not change
  the model (`IGNORED_CONFIG_KEYS`: provenance, the dtype it was saved in);
- the weights: the same tensor names with the same shapes (read from the safetensors
  headers: no tensor is read);
- the tokenizer, when the checkpoint carries one: the same vocabulary and special tokens as
  the served tokenizer (a trainer that saves none keeps the server's).

Each problem is one sentence naming the file and the key; an empty list means it fits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IGNORED_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "use_cache", "_attn_implementation_autoset", "dual_sampling_fused"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
MAX_LISTED = 5


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every safetensors file of a checkpoint (headers only)."""
    from safetensors import safe_open
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def config_problems(new: Path, served: Path) -> list[str]:
    try:
        new_config = _config(new)
    except (OSError, ValueError) as exc:
        return [f"{new / 'config.json'} is not readable JSON ({exc})"]
    old_config = _config(served)
    keys = sorted((set(new_config) | set(old_config)) - IGNORED_CONFIG_KEYS)
    differ = [f"`{k}` ({old_config.get(k)!r} served, {new_config.get(k)!r} here)"
              for k in keys if new_config.get(k) != old_config.get(k)]
    if not differ:
        return []
    return [f"{new / 'config.json'} differs from the served theta's config in "
            f"{_listed(differ)}: load_theta swaps weights of the same architecture and "
            f"shapes only; start a new server for another model"]


def weight_problems(new: Path, served: Path) -> list[str]:
    new_shapes = weight_shapes(new)
    if not new_shapes:
        return [f"{new} has no *.safetensors weights: save the checkpoint with "
                f"save_pretrained(..., safe_serialization=True)"]
    old_shapes = weight_shapes(served)
    missing = sorted(set(old_shapes) - set(new_shapes))
    extra = sorted(set(new_shapes) - set(old_shapes))
    shaped = sorted(f"{n} {list(new_shapes[n])} (served {list(old_shapes[n])})"
                    for n in set(new_shapes) & set(old_shapes) if new_shapes[n] != old_shapes[n])
    problems = []
    if missing:
        problems.append(f"{new} lacks the tensors {_listed(missing)}")
    if extra:
        problems.append(f"{new} has tensors the served theta does not: {_listed(extra)}")
    if shaped:
        problems.append(f"{new} has other shapes: {_listed(shaped)}")
    return problems


def tokenizer_problems(new: Path, served_vocab: dict[str, int],
                       served_specials: dict[str, Any]) -> list[str]:
    if not any((new / name).exists() for name in TOKENIZER_FILES):
        return []
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(new))
    except Exception as exc:  # a broken tokenizer file is the checkpoint's problem
        return [f"{new}: its tokenizer does not load ({type(exc).__name__}: {exc})"]
    vocab = tokenizer.get_vocab()
    if vocab != served_vocab:
        changed = set(vocab.items()) ^ set(served_vocab.items())
        return [f"{new} has another tokenizer ({len(vocab)} ids, {len(changed)} entries "
                f"differ from the served {len(served_vocab)}): theta must keep the server's "
                f"tokenizer"]
    specials = special_tokens(tokenizer)
    if specials != served_specials:
        return [f"{new}'s tokenizer has other special tokens ({specials} against the "
                f"served {served_specials})"]
    return []


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    return {name: getattr(tokenizer, name, None)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id")}


def problems(new_path: str, served_path: str, served_tokenizer: Any) -> list[str]:
    """Why the checkpoint at `new_path` cannot replace the served theta; [] when it can."""
    new, served = Path(new_path), Path(served_path)
    if not new.is_dir():
        return [f"there is no checkpoint directory at {new_path} (on the server's machine)"]
    if not (new / "config.json").is_file():
        return [f"{new} has no config.json: give the directory save_pretrained wrote"]
    found = config_problems(new, served) + weight_problems(new, served)
    if found:
        return found
    return tokenizer_problems(new, served_tokenizer.get_vocab(), special_tokens(served_tokenizer))
