"""Models with real shapes and random weights, made locally: no downloads.

The tiny pair (tiny_models.py) shares one KV layout. A fused engine must also serve pairs
that do not, and a GPU check needs models of real size. This module writes a checkpoint of a
named shape with random weights and a peaked output head (the head scaled, so next-token
distributions are far from uniform and differ between two models), with the tiny pair's
tokenizer, optionally widened to a real vocabulary size with tokens no text encodes to.

    python -m dual_sampling.models.shaped_models OUT_DIR --theta qwen2.5-0.5b --target qwen2.5-1.5b \
        --vocab 151665 [--device cuda] [--dtype bfloat16]

writes OUT_DIR/theta and OUT_DIR/target. `SHAPES` lists the shapes: two real ones (Qwen2.5
0.5B and 1.5B: 14/12 heads, 2 KV heads of 64/128, 24/28 layers, 151,936 output rows) and
small ones for CPU runs that differ the same way (head size, KV heads, layer count).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from dual_sampling.models.tiny_models import ensure_tiny_models

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(architecture="qwen2", hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                         num_hidden_layers=24, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(architecture="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         num_hidden_layers=28, vocab_size=151936, tie_word_embeddings=True),
    # CPU: the tiny theta's shape, and a target differing in head size, KV heads and layers
    "tiny-64": dict(architecture="llama", hidden_size=128, intermediate_size=256,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                    num_hidden_layers=2, vocab_size=1024, tie_word_embeddings=False),
    "tiny-128": dict(architecture="llama", hidden_size=256, intermediate_size=512,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                     num_hidden_layers=3, vocab_size=1024, tie_word_embeddings=False),
}
HEAD_SCALE = {"theta": 8.0, "target": 10.0}  # logits std about 5 at the real shapes


def widen_tokenizer(source: Path, dest: Path, size: int) -> None:
    """Copy the tokenizer files of `source` to `dest`, its vocabulary padded to `size` ids
    with tokens that no text encodes to (a real vocabulary's size, the same ids for any
    text)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    start = max(max(vocab.values()), max((t["id"] for t in spec["added_tokens"]), default=0)) + 1
    for token_id in range(start, size):
        vocab[f"<|unused_{token_id}|>"] = token_id
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def make_model(out_dir: Path, shape: str, head_scale: float, seed: int, tokenizer_dir: Path,
               device: str = "cpu", dtype: str = "float32") -> Path:
    """Write a checkpoint of `SHAPES[shape]` with random weights (seeded) and its output
    head scaled by `head_scale`, with the tokenizer files of `tokenizer_dir` (output rows:
    the shape's, or the tokenizer's size when larger); returns out_dir."""
    import torch
    from transformers import (AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    fields = dict(SHAPES[shape])
    architecture = fields.pop("architecture")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields["vocab_size"] = max(fields["vocab_size"], len(tokenizer))  # a widened tokenizer
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    config = config_class(**fields, **special, max_position_embeddings=4096,
                          rms_norm_eps=1e-6, dtype=dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # tied models scale their embeddings too
    model.generation_config = GenerationConfig(**special)
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        if item.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(item, out_dir / item.name)
    return Path(out_dir)


def make_pair(out_dir: str | Path, theta: str, target: str, vocab: int | None = None,
              device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict[str, Path]:
    """`{"theta": dir, "target": dir}` of the two shapes under `out_dir`, sharing the tiny
    pair's tokenizer (widened to `vocab` ids when given)."""
    out_dir = Path(out_dir).resolve()
    tokenizer_dir = Path(ensure_tiny_models()["theta"])
    if vocab is not None:
        widen_tokenizer(tokenizer_dir, out_dir / "tokenizer", vocab)
        tokenizer_dir = out_dir / "tokenizer"
    return {role: make_model(out_dir / role, shape, HEAD_SCALE[role], seed * 2 + index,
                             tokenizer_dir, device, dtype)
            for index, (role, shape) in enumerate((("theta", theta), ("target", target)))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--theta", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--target", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--vocab", type=int, help="widen the tokenizer to this many ids")
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda: fast)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pair = make_pair(args.out_dir, args.theta, args.target, args.vocab, args.device,
                     args.dtype, args.seed)
    for role, path in pair.items():
        print(f"{role}: {path}")
