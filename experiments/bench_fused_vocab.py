"""The fused engine against its two-pass bound, over vocabulary size and batch size.

    python experiments/bench_fused_vocab.py [--vocab 2048 32000 151936] [--batch 1 32 256]
                                            [--tokens 64] [--repeats 2] [--models-dir DIR]

For each vocabulary: the tiny pair made with a 2,048-id tokenizer (tiny_models, trained
here once, cached under `--models-dir`), widened to the other sizes with real, mass-carrying
output rows (tiny_models.widen_vocabulary: an LM-like long tail, nothing 40 nats down, so
the fused sampler cannot prune it). Then, one server at a time (start_vllm.sh --cpu, the
shared machine's rule): theta alone and target alone generating natively (one
/v1/completions with every prompt, experiments/bench_sample.py's native_tok_s), then the
fused server (start_vllm.sh --fused) sampling the exact q* with alpha* solved per token and
with alpha fixed at 0.5. Per vocabulary and number of prompts it prints tok/s, the two-pass
bound 1 / (1/theta + 1/target) (what running both models one after the other would give),
each fused mode's ratio to that bound, and the share of the fused run's wall time spent in
the fused logits processor (the worker's counters: alpha*, q*, the token, diagnostics).
Each figure is the best of `--repeats`.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from dual_sampling.clients.client import VLLMClient
from dual_sampling.models.tiny_models import corpus_path, make_tiny_models, widen_vocabulary
from dual_sampling.serving.launch import Servers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import PROMPT_TOKENS, fused_run, native_tok_s  # noqa: E402

BASE_VOCAB = 2048


def pair_for(vocab: int, models_dir: Path) -> dict[str, Path]:
    base = make_tiny_models(models_dir / f"v{BASE_VOCAB}", vocab_size=BASE_VOCAB)
    if vocab == BASE_VOCAB:
        return base
    return widen_vocabulary(base, models_dir / f"v{vocab}", vocab)


async def prompts_for(client: VLLMClient, batches: list[int]) -> dict[int, list[list[int]]]:
    ids = await client.tokenize(corpus_path().read_text()[:40000])
    return {batch: [ids[i * 7: i * 7 + PROMPT_TOKENS] for i in range(batch)] for batch in batches}


async def native_phase(url: str, batches: list[int], tokens: int, repeats: int
                       ) -> dict[int, float]:
    async with VLLMClient(url, name="native", timeout_s=1200) as client:
        out = {}
        for batch, prompts in (await prompts_for(client, batches)).items():
            await native_tok_s(client, prompts, 4, seed=None)  # warm-up
            out[batch] = max([await native_tok_s(client, prompts, tokens, seed=None)
                              for _ in range(repeats)])
        return out


async def fused_tok_s(client: VLLMClient, prompts: list[list[int]], tokens: int,
                      alpha: float | None) -> tuple[float, float]:
    """(tokens/s, share of the wall time spent in the fused logits processor)."""
    tok_s, elapsed, delta = await fused_run(client, prompts, tokens, alpha)
    return tok_s, delta["apply_s"] / elapsed


async def fused_phase(url: str, batches: list[int], tokens: int, repeats: int
                      ) -> dict[int, dict[str, tuple[float, float]]]:
    async with VLLMClient(url, name="fused", timeout_s=1200) as client:
        out = {}
        for batch, prompts in (await prompts_for(client, batches)).items():
            await fused_tok_s(client, prompts, 4, None)  # warm-up
            out[batch] = {}
            for mode, alpha in (("alpha*", None), ("fixed", 0.5)):
                out[batch][mode] = max([await fused_tok_s(client, prompts, tokens, alpha)
                                        for _ in range(repeats)])
        return out


def measure(models: dict[str, Path], batches: list[int], tokens: int, repeats: int,
            logs_dir: Path) -> dict:
    """Each server in turn; their logs stay under `logs_dir`."""
    results = {}
    logs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=logs_dir) as run_dir:
        for role in ("theta", "target"):
            server = Servers(run_dir=Path(run_dir) / role, models={role: models[role]})
            try:
                server.start(role)
                results[role] = asyncio.run(native_phase(server.url(role), batches, tokens,
                                                         repeats))
            finally:
                server.stop()
        server = Servers(run_dir=Path(run_dir) / "fused", models=dict(models))
        try:
            server.start_fused()
            results["fused"] = asyncio.run(fused_phase(server.url("fused"), batches, tokens,
                                                       repeats))
        finally:
            server.stop()
    return results


HEADERS = ["V", "prompts", "theta tok/s", "target tok/s", "two-pass bound", "fused alpha*",
           "alpha* / bound", "fused alpha fixed", "fixed / bound", "sampler share (alpha*)"]


def rows_of(vocab: int, batches: list[int], results: dict) -> list[list]:
    rows = []
    for batch in batches:
        theta, target = results["theta"][batch], results["target"][batch]
        bound = 1 / (1 / theta + 1 / target)
        (solved, share), (fixed, _) = (results["fused"][batch][m] for m in ("alpha*", "fixed"))
        rows.append([f"{vocab:,}", batch, f"{theta:.0f}", f"{target:.0f}", f"{bound:.0f}",
                     f"{solved:.0f}", f"{solved / bound:.2f}", f"{fixed:.0f}",
                     f"{fixed / bound:.2f}", f"{share:.0%}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 32000, 151936])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models-dir", type=Path,
                        default=Path(__file__).resolve().parents[1] / ".cache" / "bench_vocab")
    args = parser.parse_args()
    table = []
    for vocab in args.vocab:
        results = measure(pair_for(vocab, args.models_dir), args.batch, args.tokens,
                          args.repeats, args.models_dir / "logs")
        table += rows_of(vocab, args.batch, results)
        print(tabulate(table, headers=HEADERS, tablefmt="github"), flush=True)
    print(f"\n{args.tokens} tokens per prompt, {PROMPT_TOKENS}-token prompts, best of "
          f"{args.repeats}.")


if __name__ == "__main__":
    main()
