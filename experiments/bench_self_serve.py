"""One self-serving job against two, over the same prompts (dual_sampling/serving/self_serve.py).

    python experiments/bench_self_serve.py                    # tiny pair, 64 prompts
    python experiments/bench_self_serve.py --models .cache/real_models --prompts 32

Runs, in one go and on the same prompts, seed and settings: (1) one job with
`server.launch=fused` over all prompts; (2) a Hydra sweep of two such jobs
(`hydra/launcher=local`, `data.num_shards=2`), each starting its own engine, then
`python -m dual_sampling.merge`. Prints each one's wall time (engine start-up included),
its end-to-end tokens/s, the sampling tokens/s its jobs report (summary.json: the engine
already up), and the two-job / one-job ratios. On a GPU cluster each job has its own GPUs
and the ratio is the scale-out; on one CPU machine the two engines share its cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from dual_sampling.models.tiny_models import corpus_path, ensure_tiny_models


def write_prompts(path: Path, count: int) -> Path:
    """`count` prompts: the first words of the shipped corpus's lines."""
    lines = [line.split() for line in corpus_path().read_text().splitlines() if len(line.split()) >= 12]
    path.write_text("".join(json.dumps({"prompt": " ".join(words[:12])}) + "\n"
                            for words in (lines * (count // len(lines) + 1))[:count]))
    return path


def run(args: list[str]) -> float:
    """Wall seconds of `python -m dual_sampling ARGS` (raises on failure)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dual_sampling", *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dual_sampling {' '.join(args)} failed:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return time.perf_counter() - started


def job_figures(dirs: list[Path]) -> tuple[int, float]:
    """(tokens, sampling tokens/s summed over the jobs that ran side by side)."""
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    return (sum(s["tokens_this_run"] for s in summaries),
            sum(s["tokens_per_s"] for s in summaries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="a dir with theta/ and target/ (default: tiny)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    options = parser.parse_args()
    models = ({"theta": options.models / "theta", "target": options.models / "target"}
              if options.models else ensure_tiny_models())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = write_prompts(root / "prompts.jsonl", options.prompts)
        common = ["mode=sample", f"data.prompts={prompts}", f"sample.max_tokens={options.tokens}",
                  "sample.report=false", "progress=false", "wandb.mode=disabled",
                  "server.launch=fused", f"server.theta={models['theta']}",
                  f"server.target={models['target']}", "server.max_model_len=1024"]
        one_s = run([*common, f"output_dir={root / 'one'}"])
        one_tokens, one_rate = job_figures([root / "one"])
        two_s = run(["-m", "hydra/launcher=local", *common, "data.num_shards=2",
                     "data.shard_index=0,1", f"output_dir={root / 'two'}"])
        subprocess.run([sys.executable, "-m", "dual_sampling.merge", str(root / "two")],
                       check=True, capture_output=True)
        two_tokens, two_rate = job_figures([root / "two" / "job0", root / "two" / "job1"])
        assert one_tokens == two_tokens, (one_tokens, two_tokens)
    rows = [["one job", f"{one_s:.1f}", f"{one_tokens / one_s:.1f}", f"{one_rate:.1f}"],
            ["two jobs (2 shards)", f"{two_s:.1f}", f"{two_tokens / two_s:.1f}", f"{two_rate:.1f}"],
            ["two / one", f"{two_s / one_s:.2f}x", f"{one_s / two_s:.2f}x", f"{two_rate / one_rate:.2f}x"]]
    print(f"{options.prompts} prompts x {options.tokens} tokens, "
          f"{'real' if options.models else 'tiny'} pair, fused engines on this machine")
    print(tabulate(rows, headers=["run", "wall s (engine start included)", "end-to-end tok/s",
                                  "sampling tok/s (jobs summed)"], tablefmt="github"))


if __name__ == "__main__":
    main()
