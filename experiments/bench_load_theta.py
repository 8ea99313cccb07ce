"""load_theta against a server restart: what a new policy costs between RLHF rounds.

    python experiments/bench_load_theta.py [--pairs tiny,0.5b] [--kinds theta,fused] [--loads 3]

For each pair (`tiny`: the tiny Llama pair; `0.5b`: two Qwen2.5-0.5B-shaped models with random
weights, made locally by shaped_models.py, float32 on CPU) and each kind of server
start_vllm.sh starts (`theta`: one plain --theta server; `fused`: both models in one engine),
it times, one after the other in one run:

- restart: `start_vllm.sh` until the server answers (what a new policy costs without
  load_theta; stopping the old server comes on top);
- load_theta: `POST /v1/dual_sampling/load_theta` of a perturbed copy of theta and back,
  `--loads` times each, timed at the client (median), with the server's own `load_s`.

Prints one table, restart / load_theta as the ratio. The theta checkpoint's size is given.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from dual_sampling.clients.client import VLLMClient
from dual_sampling.models.shaped_models import make_pair
from dual_sampling.models.tiny_models import ensure_tiny_models, perturbed_checkpoint
from dual_sampling.serving.launch import Servers


def models(pair: str) -> dict[str, Path]:
    if pair == "tiny":
        return {k: Path(v) for k, v in ensure_tiny_models().items()}
    cache = Path(".cache/bench_load_theta") / pair
    if not (cache / "target" / "config.json").is_file():
        make_pair(cache, "qwen2.5-0.5b", "qwen2.5-0.5b")
    return {"theta": cache / "theta", "target": cache / "target"}


async def loads(url: str, paths: list[Path], count: int) -> tuple[list[float], list[float]]:
    """Client wall times and the server's load_s over `count` rounds of `paths` in turn."""
    wall, server = [], []
    async with VLLMClient(url, name="theta", timeout_s=1800) as client:
        for _ in range(count):
            for path in paths:
                start = time.perf_counter()
                reply = await client.load_theta(str(path))
                wall.append(time.perf_counter() - start)
                server.append(float(reply["load_s"]))
    return wall, server


def measure(pair: str, kind: str, count: int, work: Path) -> list:
    pair_models = models(pair)
    other = perturbed_checkpoint(pair_models["theta"], work / f"{pair}_theta_b", scale=0.05)
    size_mb = sum(f.stat().st_size for f in pair_models["theta"].glob("*.safetensors")) / 1e6
    servers = Servers(run_dir=work / f"run_{pair}_{kind}", models=pair_models,
                      extra=("--max-model-len", "2048"))
    start = time.perf_counter()
    try:
        servers.start_fused() if kind == "fused" else servers.start("theta")
        restart_s = time.perf_counter() - start
        wall, server = asyncio.run(loads(servers.url(kind), [other, pair_models["theta"]],
                                         count))
    finally:
        servers.stop()
    load_s = statistics.median(wall)
    print(f"{pair} {kind}: restart {restart_s:.1f} s, load_theta {load_s:.2f} s", flush=True)
    return [pair, kind, f"{size_mb:.0f}", f"{restart_s:.1f}", f"{load_s:.2f}",
            f"{statistics.median(server):.2f}", f"{restart_s / load_s:.1f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="tiny,0.5b")
    parser.add_argument("--kinds", default="theta,fused")
    parser.add_argument("--loads", type=int, default=3, help="rounds of (B, A) loads")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_load_theta_") as tmp:
        for pair in args.pairs.split(","):
            for kind in args.kinds.split(","):
                rows.append(measure(pair, kind, args.loads, Path(tmp)))
    print(tabulate(rows, headers=["pair", "server", "theta MB", "restart s", "load_theta s",
                                  "server load_s", "restart / load_theta"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
