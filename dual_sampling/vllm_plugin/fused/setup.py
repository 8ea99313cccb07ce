"""Check a theta/target pair for one fused engine and print the vLLM arguments that serve it.

    python -m dual_sampling.vllm_plugin.fused.setup THETA_DIR TARGET_DIR [--speculate K[:B]]

start_vllm.sh --fused runs this before starting the server: on a pair that cannot share
one engine it exits 1 with a `FusedSetupError` naming the checkpoints and what to do, before
any vLLM work. The server runs on the theta checkpoint itself with `--hf-overrides` naming
the composite architecture (fused/model.py) and the target's path, so nothing is written to
disk and theta's tokenizer and generation config are the server's.

Guards:
- one tokenizer: the same vocabulary, BOS/EOS/pad ids and ids for a probe text in both
  checkpoints (a target without tokenizer files is taken to use theta's);
- vocabulary sizes may differ only by padding: both models' output rows cover every
  tokenizer id; ids past the tokenizer's vocabulary are never sampled;
- one KV-cache group: the engine gives every attention layer of both stacks one block
  table. vLLM 0.32 puts layers in one group when they are all full attention, or all sliding
  window with one window (`UniformTypeKVCacheSpecs.is_uniform_type` in
  vllm/v1/kv_cache_interface.py, used by `get_kv_cache_groups` in
  vllm/v1/core/kv_cache_utils.py), whatever their head size, KV-head count or layer count:
  each layer gets its own region of a block, and a block's bytes are the sum over layers.
  `check_kv_groups` asks that same vLLM function about the pair's layers, so a pair is
  refused (naming each model's attention kinds) exactly when vLLM would split it: sliding
  window in one model only, two windows, hybrid layer patterns, MLA beside MHA. The server
  checks again at start-up that the engine made one group (state.kv_cache_summary,
  called by the endpoint plugin) and logs the KV bytes per token it allocated.

The composite's top-level config is theta's with the larger head size, KV-head count and
attention-head count of the two (vLLM sizes some buffers from it, e.g. the Triton attention
backend's scratch from the top-level head size and KV heads); fused/model.py builds theta
from its own checkpoint's config, so the override never reaches a submodel.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from dual_sampling.errors import DualSamplingError
from dual_sampling.wire import fused_format
ARCHITECTURE = "DualSamplingMixtureForCausalLM"  # fused/model.py
CONFIG_KEY = "dual_sampling_fused"  # the hf-overrides key fused/model.py reads
SAMPLER = "dual_sampling.vllm_plugin.fused.sampler:FusedSampler"
WORKER_EXTENSION = "dual_sampling.vllm_plugin.fused.state.FusedWorkerExtension"
PROBE = "Hello, world! 123 <s> \u00fcn\u00ef\n\tdef f(x): return x ** 2  # \u65e5\u672c"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class FusedSetupError(DualSamplingError):
    """The two checkpoints cannot be served by one fused engine; the message says why."""


def _head_dim(config: Any) -> int:
    text = config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_layout(config: Any) -> dict[str, Any]:
    """What decides a model's KV-cache pages: head size, KV heads, layers, attention heads."""
    text = config.get_text_config()
    return {"head_dim": _head_dim(config),
            "num_key_value_heads": getattr(text, "num_key_value_heads", None)
            or text.num_attention_heads,
            "num_attention_heads": text.num_attention_heads,
            "num_hidden_layers": text.num_hidden_layers}


def attention_kinds(config: Any) -> list[str]:
    """Each layer's attention kind as vLLM's model classes read the config: `full`,
    `sliding window W`, `mla`, or a `layer_types` entry vLLM has other caches for."""
    text = config.get_text_config()
    if getattr(text, "kv_lora_rank", None):
        return ["mla"] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    types = getattr(text, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers)
    names = {"full_attention": "full", "sliding_attention": f"sliding window {window}"}
    return [names.get(kind, kind) for kind in types]


def check_kv_groups(config_theta: Any, config_target: Any) -> None:
    """FusedSetupError unless vLLM would put every attention layer of both models in ONE
    KV-cache group (its own rule, asked on the layers' specs; no engine is started)."""
    import torch
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec, SlidingWindowSpec, UniformTypeKVCacheSpecs)
    specs, kinds = {}, {}
    for role, config in (("theta", config_theta), ("target", config_target)):
        layout, kinds[role] = kv_layout(config), attention_kinds(config)
        shape = dict(block_size=16, num_kv_heads=layout["num_key_value_heads"],
                     head_size=layout["head_dim"], dtype=torch.bfloat16)
        for layer, kind in enumerate(kinds[role]):
            if kind == "full":
                specs[f"{role}.{layer}"] = FullAttentionSpec(**shape)
            elif kind.startswith("sliding window "):
                specs[f"{role}.{layer}"] = SlidingWindowSpec(
                    **shape, sliding_window=int(kind.split()[-1]))
            else:
                specs = None  # a kind this check does not model: refuse, naming it
                break
        if specs is None:
            break
    if specs is None or not UniformTypeKVCacheSpecs.is_uniform_type(specs):
        summary = "; ".join(f"{role}: {', '.join(sorted(set(k)))}" for role, k in kinds.items())
        raise FusedSetupError(
            f"vLLM cannot put both models' attention layers in one KV-cache group ({summary}):"
            f" it groups layers together only when all are full attention or all use one "
            f"sliding window. Serve the two models on two servers instead "
            f"(sample.transport=session).")


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV-cache bytes one token takes in one model: K and V of every layer."""
    layout, text = kv_layout(config), config.get_text_config()
    return (2 * text.num_hidden_layers * layout["num_key_value_heads"] * layout["head_dim"]
            * dtype_bytes)


def _check_tokenizers(theta: Path, target: Path) -> int:
    """The tokenizer's vocabulary size (ids with a token), after checking both agree."""
    tok_theta = AutoTokenizer.from_pretrained(theta)
    if not any((target / name).exists() for name in TOKENIZER_FILES):
        return len(tok_theta)
    tok_target = AutoTokenizer.from_pretrained(target)
    problems = []
    ids_theta, ids_target = tok_theta.encode(PROBE), tok_target.encode(PROBE)
    if ids_theta != ids_target:
        problems.append(f"ids for {PROBE!r}: {ids_theta[:12]} vs {ids_target[:12]}")
    if tok_theta.get_vocab() != tok_target.get_vocab():
        problems.append(f"vocabularies differ ({len(tok_theta)} vs {len(tok_target)} tokens)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok_theta, name) != getattr(tok_target, name):
            problems.append(f"{name} {getattr(tok_theta, name)} vs {getattr(tok_target, name)}")
    if problems:
        raise FusedSetupError(
            f"theta ({theta}) and target ({target}) do not share a tokenizer: "
            f"{'; '.join(problems)}. Dual sampling mixes the two next-token distributions id "
            f"by id, so both models must use one tokenizer: pick a target trained with "
            f"theta's tokenizer.")
    return len(tok_theta)


def hf_overrides(theta: str | Path, target: str | Path) -> dict[str, Any]:
    """Check the pair (FusedSetupError) and return the `--hf-overrides` of the fused server."""
    theta, target = Path(theta).resolve(), Path(target).resolve()
    for role, path in (("theta", theta), ("target", target)):
        if not (path / "config.json").is_file():
            raise FusedSetupError(f"{role} checkpoint {path} has no config.json: give a local "
                                  f"model directory (--{role} DIR).")
    config_theta = AutoConfig.from_pretrained(theta)
    config_target = AutoConfig.from_pretrained(target)
    vocab = _check_tokenizers(theta, target)
    for role, path, config in (("theta", theta, config_theta), ("target", target, config_target)):
        rows = config.get_text_config().vocab_size
        if rows < vocab:
            raise FusedSetupError(
                f"{role} ({path}) has {rows} output rows but the tokenizer has {vocab} tokens: "
                f"the vocabularies differ by more than padding, so the two models cannot be "
                f"mixed over one vocabulary.")
    check_kv_groups(config_theta, config_target)
    layouts = [kv_layout(config_theta), kv_layout(config_target)]
    return {"architectures": [ARCHITECTURE],
            **{key: max(layout[key] for layout in layouts)
               for key in ("head_dim", "num_key_value_heads", "num_attention_heads")},
            CONFIG_KEY: {"target": str(target), "vocab_size": vocab,
                         "target_architectures": list(config_target.architectures)}}


def speculative_config(theta: str | Path, k: int, up_to: int = 0) -> dict[str, Any]:
    """vLLM's `--speculative-config` of the speculative mode: theta as a probabilistic draft
    of k tokens a step, checked by vLLM's standard rejection rule (speculate.py); up_to > 0
    drafts only while the engine's batch holds at most that many requests (vLLM's dynamic
    schedule: K = 0 above it, where verifying drafts costs more than it saves)."""
    config = {"method": "draft_model", "model": str(Path(theta).resolve()),
              "num_speculative_tokens": int(k), "draft_sample_method": "probabilistic",
              "rejection_sample_method": "standard"}
    if up_to:
        config["num_speculative_tokens_per_batch_size"] = [[1, up_to, k],
                                                           [up_to + 1, 1 << 20, 0]]
    return config


def parse_speculate(value: str) -> tuple[int, int]:
    """fused_format.parse_speculate, as a FusedSetupError naming --speculate."""
    try:
        return fused_format.parse_speculate(value)
    except ValueError:
        raise FusedSetupError(f"--speculate {value!r}: {fused_format.SPECULATE_HELP}") from None


def server_args(theta: str | Path, target: str | Path, speculate: str = "0") -> list[str]:
    """The vLLM server arguments that make a fused server of the pair (after the checks);
    speculate `K` or `K:B` with K > 0: the speculative mode (speculate.py: no logits
    processor, which vLLM refuses there, and synchronous scheduling)."""
    speculate, up_to = parse_speculate(str(speculate))
    overrides = hf_overrides(theta, target)
    config_theta, config_target = (AutoConfig.from_pretrained(p) for p in (theta, target))
    max_len = min(getattr(c.get_text_config(), "max_position_embeddings", 1 << 30)
                  for c in (config_theta, config_target))
    args = ["--model", str(Path(theta).resolve()), "--hf-overrides", json.dumps(overrides),
            "--worker-extension-cls", WORKER_EXTENSION, "--max-model-len", str(max_len)]
    if speculate:
        return args + ["--speculative-config",
                       json.dumps(speculative_config(theta, speculate, up_to)),
                       "--no-async-scheduling"]
    return args + ["--logits-processors", SAMPLER]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dual_sampling.vllm_plugin.fused.setup",
        description="Check a theta/target pair for one fused engine and print the vLLM "
                    "arguments that serve it, one per line (start_vllm.sh --fused runs it).")
    parser.add_argument("theta", help="theta's checkpoint directory")
    parser.add_argument("target", help="the target's checkpoint directory")
    parser.add_argument("--speculate", default="0",
                        help="K or K:B: theta drafts K tokens a step (0: off)")
    args = parser.parse_args(argv)
    try:
        print("\n".join(server_args(args.theta, args.target, speculate=args.speculate)))
    except FusedSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
