"""Check a theta/target pair for one fused engine and print the vLLM arguments that serve it.

    python -m dual_sampling.vllm_plugin.fused_setup THETA_DIR TARGET_DIR   # one arg a line

start_vllm.sh --fused runs this before starting the server: on a pair that cannot share
one engine it exits 1 with a `FusedSetupError` naming the checkpoints and what to do, before
any vLLM work. The server runs on the theta checkpoint itself with `--hf-overrides` naming
the composite architecture (fused_model.py) and the target's path, so nothing is written to
disk and theta's tokenizer and generation config are the server's.

Guards:
- one tokenizer: the same vocabulary, BOS/EOS/pad ids and ids for a probe text in both
  checkpoints (a target without tokenizer files is taken to use theta's);
- vocabulary sizes may differ only by padding: both models' output rows cover every
  tokenizer id; ids past the tokenizer's vocabulary are never sampled;
- one KV-cache layout: vLLM gives both stacks' attention layers one block table and one
  page size, so both need the same head size, KV heads and attention kind (no sliding
  window in one only).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from dual_sampling.errors import DualSamplingError
ARCHITECTURE = "DualSamplingMixtureForCausalLM"  # fused_model.py
CONFIG_KEY = "dual_sampling_fused"  # the hf-overrides key fused_model.py reads
EXTRA_KEY = "dual_sampling_fused"  # SamplingParams.extra_args key of fused requests
SAMPLER = "dual_sampling.vllm_plugin.fused_sampler:FusedSampler"
WORKER_EXTENSION = "dual_sampling.vllm_plugin.fused_state.FusedWorkerExtension"
PROBE = "Hello, world! 123 <s> \u00fcn\u00ef\n\tdef f(x): return x ** 2  # \u65e5\u672c"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class FusedSetupError(DualSamplingError):
    """The two checkpoints cannot be served by one fused engine; the message says why."""


def _head_dim(config: Any) -> int:
    text = config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_layout(config: Any) -> dict[str, Any]:
    """What decides a model's KV-cache pages: head size, KV heads, attention kind."""
    text = config.get_text_config()
    return {"head_dim": _head_dim(config),
            "num_key_value_heads": getattr(text, "num_key_value_heads", None)
            or text.num_attention_heads,
            "sliding_window": getattr(text, "sliding_window", None)}


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
    layout_theta, layout_target = kv_layout(config_theta), kv_layout(config_target)
    if layout_theta != layout_target:
        raise FusedSetupError(
            f"vLLM cannot place both models' KV caches together: theta ({theta}) has "
            f"{layout_theta}, target ({target}) has {layout_target}; one engine gives all "
            f"attention layers one page layout. Serve the two models on two servers instead "
            f"(sample.transport=session).")
    return {"architectures": [ARCHITECTURE],
            CONFIG_KEY: {"target": str(target), "vocab_size": vocab,
                         "theta_architectures": list(config_theta.architectures),
                         "target_architectures": list(config_target.architectures)}}


def server_args(theta: str | Path, target: str | Path) -> list[str]:
    """The vLLM server arguments that make a fused server of the pair (after the checks)."""
    overrides = hf_overrides(theta, target)
    config_theta, config_target = (AutoConfig.from_pretrained(p) for p in (theta, target))
    max_len = min(getattr(c.get_text_config(), "max_position_embeddings", 1 << 30)
                  for c in (config_theta, config_target))
    return ["--model", str(Path(theta).resolve()), "--hf-overrides", json.dumps(overrides),
            "--logits-processors", SAMPLER, "--worker-extension-cls", WORKER_EXTENSION,
            "--max-model-len", str(max_len)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        print("\n".join(server_args(*argv)))
    except FusedSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
