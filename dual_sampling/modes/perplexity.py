"""`mode=perplexity`: sliding-window perplexity of a served model from actual-token logprobs.

    python -m dual_sampling mode=perplexity model.url=http://127.0.0.1:8000 \
        data.path=[wiki.valid.txt,wiki.test.txt] ppl.context_length=2048 ppl.stride=512 \
        output_dir=runs/ppl

The method of the Hugging Face perplexity guide: each corpus is tokenised once by the served
model's tokenizer (`ppl.add_bos` puts the model's BOS id first, nothing else is added), cut
into windows of `context_length` tokens whose starts advance by `stride`; a window scores the
tokens past the previous window's end and never its own first token (it has no context), so
the overlap is context only. With stride < context_length every token after the first is
scored exactly once; with stride == context_length (no overlap) each window's first token
goes unscored, as in the guide. Natural logs throughout: NLL in nats per token, perplexity
= exp(mean NLL).

Each window is one request for the actual tokens' logprobs only, `ppl.concurrency` in
flight: on a server with this package's plugin, `/v1/topk` with k = 1, whose binary reply
carries each actual token's float32 logprob with no JSON and no detokenising (windows must
leave the one generated slot free: context_length < max-model-len); otherwise stock
`/v1/completions` with `prompt_logprobs=0` (`VLLMClient.actual_token_logprobs`), which also
takes windows of exactly max-model-len. Before any window is
scored: the corpora are read (DataError names an empty or missing file), the server answers
(ServerError after retries), `ppl.context_length` fits its max-model-len and it returns raw
logprobs for a forced token (ServerMismatchError), and BOS exists when asked for.

Writes `output_dir/perplexity.json` (per corpus and overall, token-weighted),
`output_dir/windows.jsonl` (one row per window, for plots), the same to W&B, and prints a table.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from dual_sampling.clients.actual_logprobs import Scorer, check_raw_logprobs, choose_scorer
from dual_sampling.clients.client import ServerInfo, VLLMClient, server_client
from dual_sampling.config import PerplexityParams, PerplexityRunConfig
from dual_sampling.errors import ConfigError, DataError, ServerMismatchError
from dual_sampling.files import data
from dual_sampling.tracking import Tracker

log = logging.getLogger(__name__)

RESULT_FILE = "perplexity.json"
WINDOWS_FILE = "windows.jsonl"


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go to the model; tokens [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def plan_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The guide's windows over `num_tokens` tokens; windows that would score nothing are left out.

    Starts advance by `stride`, each window spans up to `context_length` tokens and scores
    from max(previous window's end, its own begin + 1); the last window ends at `num_tokens`.
    """
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == num_tokens:
            break
    return windows


async def score_windows(scorer: Scorer, token_ids: list[int], windows: list[Window],
                        concurrency: int, on_done: Optional[Callable[[int], None]] = None
                        ) -> np.ndarray:
    """Total NLL (nats) of each window's scored tokens, `(W,)`; `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def score(window: Window) -> float:
        async with gate:
            (logp,) = await scorer([token_ids[window.begin:window.end]], None)
        # Row j of logp scores token begin + 1 + j.
        nll = -float(logp[window.score_from - window.begin - 1:].sum())
        if on_done is not None:
            on_done(window.num_scored)
        return nll

    return np.array(await asyncio.gather(*(score(w) for w in windows)), dtype=np.float64)


def summarize(nll_sums: np.ndarray, num_scored: np.ndarray, seconds: float) -> dict[str, Any]:
    """Token-weighted mean NLL (nats/token), perplexity, counts and tokens/s over windows `(W,)`."""
    tokens = int(num_scored.sum())
    mean_nll = float(nll_sums.sum() / tokens)
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": tokens,
            "num_windows": int(len(num_scored)), "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}


async def preflight(client: VLLMClient, params: PerplexityParams) -> ServerInfo:
    """The server answers, takes windows of context_length tokens and returns raw logprobs."""
    info = await client.describe()
    if info.max_model_len and params.context_length > info.max_model_len:
        raise ServerMismatchError(
            f"config key `ppl.context_length` = {params.context_length} is more than the "
            f"max-model-len {info.max_model_len} of the model server at {client.url}: lower "
            f"ppl.context_length to at most {info.max_model_len}, or restart the server with "
            f"a larger --max-model-len.")
    if params.add_bos and info.bos_token_id is None:
        raise ConfigError(
            f"config key `ppl.add_bos` = True is invalid: the model server at {client.url} "
            f"names no BOS token. Set ppl.add_bos=false.")
    await check_raw_logprobs(client)
    return info


async def tokenize_corpus(client: VLLMClient, path: str, text: str,
                          bos_token_id: Optional[int]) -> list[int]:
    """The whole corpus in one request, BOS first when given; DataError below 2 tokens."""
    token_ids = await client.tokenize(text, add_special_tokens=False)
    if bos_token_id is not None:
        token_ids = [bos_token_id] + token_ids
    if len(token_ids) < 2:
        raise DataError(f"corpus {path} is {len(token_ids)} token(s) long: perplexity needs "
                        f"at least 2 (one of context, one scored).")
    return token_ids


def run(config: PerplexityRunConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


async def _run(config: PerplexityRunConfig) -> dict[str, Any]:
    params = config.ppl
    texts = {path: data.read_corpus(path) for path in config.data.path}
    out = Path(config.output_dir)
    client = server_client(config.model, "model", max_connections=params.concurrency + 4)
    async with client:
        info = await preflight(client, params)
        scorer, route = choose_scorer(client, info, params.context_length)
        log.info("scoring windows through %s", route)
        bos = info.bos_token_id if params.add_bos else None
        corpora = {path: await tokenize_corpus(client, path, text, bos)
                   for path, text in texts.items()}
        plans = {path: plan_windows(len(ids), params.context_length, params.stride)
                 for path, ids in corpora.items()}
        tracker = Tracker(config)
        bar = tqdm(total=sum(w.num_scored for plan in plans.values() for w in plan), unit="tok",
                   desc="perplexity", disable=not config.progress, dynamic_ncols=True)
        per_corpus, rows, all_nll, all_scored = [], [], [], []
        try:
            for path, token_ids in corpora.items():
                windows = plans[path]
                started = time.perf_counter()
                nll_sums = await score_windows(scorer, token_ids, windows, params.concurrency,
                                               on_done=bar.update)  # (W,)
                num_scored = np.array([w.num_scored for w in windows])  # (W,)
                per_corpus.append({"corpus": path, "corpus_tokens": len(token_ids),
                                   **summarize(nll_sums, num_scored, time.perf_counter() - started)})
                rows += [{"corpus": path, "window": i, "begin": w.begin, "end": w.end,
                          "score_from": w.score_from, "num_scored": w.num_scored,
                          "nll_sum": float(nll), "mean_nll": float(nll) / w.num_scored}
                         for i, (w, nll) in enumerate(zip(windows, nll_sums))]
                all_nll.append(nll_sums)
                all_scored.append(num_scored)
            overall = summarize(np.concatenate(all_nll), np.concatenate(all_scored),
                                sum(c["seconds"] for c in per_corpus))
            result = {"model": info.model, "url": client.url, "route": route,
                      "context_length": params.context_length, "stride": params.stride,
                      "add_bos": params.add_bos, "corpora": per_corpus, "overall": overall}
            out.mkdir(parents=True, exist_ok=True)
            (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
            with (out / WINDOWS_FILE).open("w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows)
            columns = list(rows[0])
            tracker.table("windows", columns, [[row[c] for c in columns] for row in rows])
            tracker.summary({**{f"overall/{k}": v for k, v in overall.items()},
                             **{f"{c['corpus']}/{k}": v for c in per_corpus for k, v in c.items()
                                if k != "corpus"}})
        finally:
            bar.close()
            tracker.finish()
    print(format_result(result))
    return result


def format_result(result: dict[str, Any]) -> str:
    """Per-corpus and overall rows as a GitHub-style table."""
    keys = ("num_tokens", "num_windows", "mean_nll", "perplexity", "tokens_per_s")
    rows = [[c["corpus"], *(c[k] for k in keys)] for c in result["corpora"]]
    rows.append(["overall", *(result["overall"][k] for k in keys)])
    title = (f"{result['model']} at {result['url']}: context_length {result['context_length']}, "
             f"stride {result['stride']}")
    headers = ["corpus", "tokens", "windows", "mean NLL (nats)", "perplexity", "tokens/s"]
    return title + "\n" + tabulate(rows, headers=headers, tablefmt="github",
                                   floatfmt=("", "", "", ".5f", ".4f", ".0f"))
