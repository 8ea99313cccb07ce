"""Completions of theta alone, the target alone and q* side by side, from one fused server.

    python -m dual_sampling.side_by_side URL PROMPTS [--count 3] [--max-tokens 64] [--seed 0]
                                         [--temperature 1.0]

Samples the first `count` prompts of PROMPTS (a prompts file as sample mode reads it) three
times through `DualSampler` with the same seed: alpha fixed at 0 (pi_theta), fixed at 1
(pi_t) and alpha* per token (q*). With the seed of a sample-mode run, the q* column is that
run's first completions token for token (tokens depend on seed, prompt index and weights
only). Prints one table: the prompt, then a column per distribution, with each completion's
token count and whether it ended at EOS or a stop string.
"""
from __future__ import annotations

import argparse
import asyncio
import textwrap
from typing import Any

from tabulate import tabulate

from dual_sampling.api import DualSampler
from dual_sampling.files.data import read_prompts

COLUMNS = (("theta alone (alpha=0)", 0.0), ("target alone (alpha=1)", 1.0),
           ("q* (alpha*)", None))


def prompt_text(row: dict[str, Any]) -> str:
    """What the user asked: the last message of a chat prompt, or the prompt text."""
    return row["messages"][-1]["content"] if "messages" in row else row["prompt"]


def completions(url: str, prompts: list[dict[str, Any]], max_tokens: int, seed: int,
                temperature: float = 1.0) -> dict[str, list[dict[str, Any]]]:
    """The records of each column's run, in prompt order. The three runs go to the server
    at once: its engine batches them (a third of the time of one after another)."""
    async def run() -> list[list[dict[str, Any]]]:
        async with DualSampler(url, chat_template=True, seed=seed) as sampler:
            return await asyncio.gather(*(
                sampler.sample(prompts, max_tokens=max_tokens, alpha=alpha, seed=seed,
                               temperature=temperature) for _, alpha in COLUMNS))
    return dict(zip((title for title, _ in COLUMNS), asyncio.run(run())))


def cell(record: dict[str, Any], width: int, eos_text: str) -> str:
    ending = "ended" if record["finish_reason"] == "stop" else "cut at max_tokens"
    footer = f"[{record['num_tokens']} tokens, {ending}, mean alpha {record['mean_alpha']:.2f}]"
    text = record["completion"]
    if record["finish_reason"] == "stop" and text.endswith(eos_text):
        text = text[:-len(eos_text)]  # the footer says it ended
    return textwrap.fill(text.strip(), width) + "\n" + footer


def table(prompts: list[dict[str, Any]], columns: dict[str, list[dict[str, Any]]],
          eos_text: str = "", width: int = 34) -> str:
    rows = [[textwrap.fill(prompt_text(p), 18)] + [cell(columns[title][i], width, eos_text)
                                                 for title, _ in COLUMNS]
            for i, p in enumerate(prompts)]
    return tabulate(rows, headers=["prompt"] + [title for title, _ in COLUMNS],
                    tablefmt="grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a fused server (start_vllm.sh --fused)")
    parser.add_argument("prompts", help="a prompts file (JSONL with prompt or messages)")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eos-text", default="<|im_end|>",
                        help="dropped from the end of a completion that ended at EOS")
    args = parser.parse_args()
    prompts = read_prompts(args.prompts)[:args.count]
    columns = completions(args.url, prompts, args.max_tokens, args.seed, args.temperature)
    print(table(prompts, columns, args.eos_text))


if __name__ == "__main__":
    main()
