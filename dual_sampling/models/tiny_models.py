"""The locally made tiny model pair: `theta` and `target`, two small Llama models sharing one tokenizer.

No weights can be downloaded where this project is tested, so the two models it serves are
made here, in under a minute on two CPU cores: a byte-level BPE tokenizer trained on the
shipped corpus (`assets/corpus.txt`), then two 2-layer `LlamaForCausalLM` models trained
briefly on different halves of it (different seeds), with their output heads scaled by
different factors so that their next-token distributions are peaked and differ.

Run:
    python -m dual_sampling.models.tiny_models OUT_DIR [--seed N] [--force]

writes OUT_DIR/theta and OUT_DIR/target (each servable by vLLM: config.json,
generation_config.json, model.safetensors in float32, tokenizer files with a chat template)
and OUT_DIR/tiny_models.json, the completeness marker holding the config hash and the stats.
Tests call `ensure_tiny_models()`, which builds into `default_models_dir()` once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

MODEL_NAMES = ("theta", "target")
MARKER_NAME = "tiny_models.json"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Bump when the recipe below changes in a way the config hash cannot see.
RECIPE_VERSION = 1

ARCHITECTURE = dict(
    hidden_size=128,
    num_attention_heads=2,  # head_dim 64: the vLLM CPU attention kernel refuses 16
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=256,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
SEQ_LEN = 64
BATCH_SIZE = 16
LEARNING_RATE = 5e-3
# Output-head scales (logit temperatures 1/scale): peaked, and unlike each other.
HEAD_SCALE = {"theta": 2.0, "target": 2.5}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_path() -> Path:
    """The shipped English corpus (ASCII, about 420 KB) used for the tokenizer, training and tests."""
    return Path(str(resources.files("dual_sampling") / "assets" / "corpus.txt"))


def default_models_dir() -> Path:
    """Where tests keep the built pair: `$DUAL_SAMPLING_MODELS_DIR`, else `<repo>/.cache/tiny_models`."""
    env = os.environ.get("DUAL_SAMPLING_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "tiny_models"


def _publish(build_dir: Path, out_dir: Path, marker: dict, marker_name: str = MARKER_NAME
             ) -> None:
    """Write the marker into a finished build and move it to `out_dir` (replacing it)."""
    (build_dir / marker_name).write_text(json.dumps(marker, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    build_dir.rename(out_dir)


def ensure_tiny_models(out_dir: str | os.PathLike | None = None, **kwargs) -> dict[str, Path]:
    """Build the pair into `out_dir` (default `default_models_dir()`) unless already complete."""
    return make_tiny_models(default_models_dir() if out_dir is None else out_dir, **kwargs)


def make_tiny_models(
    out_dir: str | os.PathLike,
    seed: int = 0,
    vocab_size: int = 1024,
    train_steps: int = 150,
    force: bool = False,
) -> dict[str, Path]:
    """Write `out_dir/theta` and `out_dir/target`; return `{"theta": path, "target": path}`.

    Deterministic in `seed`: same bytes of model.safetensors on the same software, whatever
    the core count (the build runs on one torch thread). Skips the
    work when `out_dir` holds a complete build of the same config (marker file with the config
    hash) unless `force`. Concurrent callers serialise on a lock file beside `out_dir`; the
    build goes to a temporary sibling directory and is renamed into place when complete.
    """
    config = dict(
        recipe=RECIPE_VERSION, seed=seed, vocab_size=vocab_size, train_steps=train_steps,
        architecture=ARCHITECTURE, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, head_scale=HEAD_SCALE,
        corpus_sha256=hashlib.sha256(corpus_path().read_bytes()).hexdigest(),
    )
    return build_once(out_dir, config, _build, MARKER_NAME, "tiny models", force=force)


def build_once(out_dir: str | os.PathLike, config: dict, build, marker_name: str, what: str,
               force: bool = False) -> dict[str, Path]:
    """`{"theta": out_dir/theta, "target": out_dir/target}`, built by `build(build_dir,
    config) -> stats` unless `out_dir` already holds a complete build of `config`.

    Complete means both models' files are there and the marker `marker_name` holds the hash
    of `config`. Concurrent callers serialise on a lock file beside `out_dir`; the build goes
    to a temporary sibling directory and is renamed into place when complete, so a killed
    build leaves nothing that looks finished."""
    out_dir = Path(out_dir).resolve()
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    paths = {name: out_dir / name for name in MODEL_NAMES}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not force and _is_complete(out_dir, config_hash, marker_name):
            return paths
        started = time.perf_counter()
        build_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
        try:
            stats = build(build_dir, config)
            marker = dict(config_hash=config_hash, config=config, stats=stats,
                          build_seconds=round(time.perf_counter() - started, 2))
            _publish(build_dir, out_dir, marker, marker_name)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    print(f"{what} in {out_dir} ({marker['build_seconds']} s): {json.dumps(stats)}")
    return paths


def read_marker(out_dir: str | os.PathLike, marker_name: str = MARKER_NAME) -> dict:
    """The marker of a complete build: config, config_hash, stats, build_seconds."""
    return json.loads((Path(out_dir) / marker_name).read_text())


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(out_dir: Path, config_hash: str, marker_name: str) -> bool:
    needed = ("config.json", "generation_config.json", "model.safetensors",
              "tokenizer.json", "tokenizer_config.json")
    if not all((out_dir / name / file).is_file() for name in MODEL_NAMES for file in needed):
        return False
    try:
        return read_marker(out_dir, marker_name)["config_hash"] == config_hash
    except (OSError, ValueError, KeyError):
        return False


def _build(build_dir: Path, config: dict) -> dict:
    import torch

    # One thread: the bytes then do not depend on the core count, and a build sharing two
    # cores with running vLLM servers does not stall in OpenMP barriers (5x slower seen).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_single_threaded(build_dir, config)
    finally:
        torch.set_num_threads(threads)


def _build_single_threaded(build_dir: Path, config: dict) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    text = corpus_path().read_text(encoding="utf-8")
    tokenizer = _train_tokenizer(text, config["vocab_size"])
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
    model_config = LlamaConfig(
        vocab_size=config["vocab_size"], bos_token_id=special[BOS], eos_token_id=special[EOS],
        pad_token_id=special[PAD], torch_dtype="float32", **ARCHITECTURE,
    )
    # Each model learns from its own half of the corpus, so their predictions differ.
    middle = text.index("\n\n", len(text) // 2)
    halves = {"theta": text[:middle], "target": text[middle:]}
    models, held_out = {}, []
    for index, name in enumerate(MODEL_NAMES):
        ids = torch.tensor(tokenizer(halves[name], verbose=False)["input_ids"])  # (N,)
        held_out.append(ids[-4 * SEQ_LEN:].view(4, SEQ_LEN))
        torch.manual_seed(config["seed"] * len(MODEL_NAMES) + index)
        model = LlamaForCausalLM(model_config)
        _train(model, ids[:-4 * SEQ_LEN], config["train_steps"], config["seed"] * 2 + index)
        with torch.no_grad():
            model.lm_head.weight.mul_(HEAD_SCALE[name])
        model.generation_config = GenerationConfig(
            bos_token_id=special[BOS], eos_token_id=special[EOS], pad_token_id=special[PAD])
        model.save_pretrained(build_dir / name, safe_serialization=True)
        tokenizer.save_pretrained(build_dir / name)
        models[name] = model
    return _pair_stats(models, torch.cat(held_out))


def _train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(text.split("\n\n"), trainer=trainer)
    bos_id = core.token_to_id(BOS)
    # Llama convention: `tokenizer(text)` starts with <s>; the chat template adds it itself.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=CHAT_TEMPLATE, model_max_length=ARCHITECTURE["max_position_embeddings"],
    )


def _train(model, ids, steps: int, seed: int) -> None:
    """Next-token training on random windows of `ids` (N,): AdamW, cosine-decayed rate."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    offsets = torch.arange(SEQ_LEN + 1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH_SIZE,), generator=generator)
        batch = ids[starts[:, None] + offsets]  # (B, SEQ_LEN + 1)
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _pair_stats(models: dict, windows) -> dict:
    """Mean per-position entropy (nats) of each model and mean KL both ways on held-out windows."""
    import torch

    with torch.no_grad():
        logp = {name: torch.log_softmax(model(input_ids=windows).logits, -1)  # (W, L, V)
                for name, model in models.items()}
    p_theta, p_target = logp["theta"].exp(), logp["target"].exp()
    return dict(
        entropy_theta=-(p_theta * logp["theta"]).sum(-1).mean().item(),
        entropy_target=-(p_target * logp["target"]).sum(-1).mean().item(),
        kl_theta_target=(p_theta * (logp["theta"] - logp["target"])).sum(-1).mean().item(),
        kl_target_theta=(p_target * (logp["target"] - logp["theta"])).sum(-1).mean().item(),
        positions=int(windows.numel()),
    )


def widen_vocabulary(models: dict[str, Path], out_dir: str | os.PathLike, vocab_size: int,
                     seed: int = 0, tail_logit: float = 10.0, logit_std: float = 2.0
                     ) -> dict[str, Path]:
    """The pair with its tokenizer and both models widened to `vocab_size` ids (151,936 is
    Qwen's), written to `out_dir/theta` and `out_dir/target`; returns their paths.

    The tokenizer keeps its merges, so it encodes text exactly as before; the new ids are
    vocabulary entries no merge reaches (`zq<hex>`), which the models can still sample and
    read back. Their output rows are real and differ between the models: -`tail_logit` along
    the model's mean final hidden state (on the corpus) plus Gaussian rows with logit
    standard deviation `logit_std`, so at a typical position the new ids sit 15 to 35 nats
    below the top and hold about 1e-3 of the mass, a real LM's long tail (nothing there is
    40 nats down: maths/kernels.py cannot prune it), and more at flat positions. Their input rows
    copy random rows of the trained embedding. Deterministic in `seed`; skips the work when
    `out_dir` already holds this widening (marker file).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, PreTrainedTokenizerFast

    out_dir = Path(out_dir).resolve()
    marker = dict(sources={n: str(Path(p).resolve()) for n, p in models.items()},
                  vocab_size=vocab_size, seed=seed, tail_logit=tail_logit, logit_std=logit_std)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in MODEL_NAMES}
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / MARKER_NAME).is_file() and \
                json.loads((out_dir / MARKER_NAME).read_text()) == marker:
            return paths
        build_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
        try:
            generator = torch.Generator().manual_seed(seed)
            for name in MODEL_NAMES:
                source, target = Path(models[name]), build_dir / name
                shutil.copytree(source, target)
                tokenizer = json.loads((source / "tokenizer.json").read_text())
                vocab = tokenizer["model"]["vocab"]
                old_size = len(vocab)
                fresh = (f"zq{i:x}" for i in range(4 * vocab_size))
                while len(vocab) < vocab_size:
                    token = next(fresh)
                    if token not in vocab:
                        vocab[token] = len(vocab)
                (target / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
                weights = load_file(source / "model.safetensors")
                embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
                extra = vocab_size - old_size
                copies = torch.randint(0, old_size, (extra,), generator=generator)
                text = corpus_path().read_text(encoding="utf-8")[:8000]
                ids = PreTrainedTokenizerFast.from_pretrained(source)(text)["input_ids"][:512]
                with torch.no_grad():
                    hidden = AutoModel.from_pretrained(source)(
                        torch.tensor([ids])).last_hidden_state[0]  # (L, H)
                mean = hidden.mean(dim=0)  # (H,): h . mean / |mean|^2 is ~1 +- 0.3
                noise = torch.randn(extra, head.shape[1], generator=generator)
                rows = -tail_logit * mean / mean.dot(mean) + noise * logit_std / hidden.norm(
                    dim=-1).mean()
                weights["model.embed_tokens.weight"] = torch.cat([embed, embed[copies]])
                weights["lm_head.weight"] = torch.cat([head, rows.to(head.dtype)])
                save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
                config = json.loads((target / "config.json").read_text())
                config["vocab_size"] = vocab_size
                (target / "config.json").write_text(json.dumps(config, indent=2))
            _publish(build_dir, out_dir, marker)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return paths


def perturbed_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike,
                         scale: float = 0.05, seed: int = 0) -> Path:
    """A copy of the checkpoint at `source` with every weight moved by Gaussian noise of
    `scale` times its tensor's standard deviation: another policy of the same shapes (what a
    training step writes), for load_theta's tests, the README's round loop and the
    benchmark. Written next to `out_dir` and renamed into place, so a reader never sees half
    a checkpoint; returns `out_dir`."""
    import torch
    from safetensors.torch import load_file, save_file

    source, out_dir = Path(source), Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        generator = torch.Generator().manual_seed(seed)
        for file in source.iterdir():
            if file.suffix != ".safetensors" and file.is_file():
                shutil.copy2(file, build_dir / file.name)
        for file in sorted(source.glob("*.safetensors")):
            weights = load_file(file)
            for name, tensor in weights.items():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                spread = tensor.float().std() if tensor.numel() > 1 else tensor.float().abs()
                weights[name] = (tensor.float() + scale * spread * noise).to(tensor.dtype)
            save_file(weights, build_dir / file.name, metadata={"format": "pt"})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(build_dir, out_dir)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args()
    for name, path in make_tiny_models(args.out_dir, seed=args.seed, force=args.force).items():
        print(f"{name}: {path}")
