"""The dual-sampling job behind `mode=sample` and `DualSampler.sample`: servers checked,
transport chosen, theta pinned, records produced.

    sampling = await Sampling.open(thetas, targets, params, seed=0)
    await sampling.run(prompts, on_record)   # prompts: [{"index", "prompt"|"messages",
                                             #            "sample_indices"}], on_record(dict)

`Sampling.open` reads every server's facts, picks the transport (fused when theta.url serves
both models, else session or request over theta/target pairs), checks that all servers
share theta[0]'s tokenizer and allow top_k, and pins each theta client to the
`theta_version` its server serves (load_theta, vllm_plugin/theta_route.py): a request after
another client swapped theta fails with ThetaChangedError, so every record's
`theta_version`/`theta_path` names the weights that produced all of its tokens. `run` spreads
the prompts over replica pairs (`generate`) and hands each finished sample's record
(`sequence_record`: the row samples.jsonl stores) to `on_record`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from typing import Any, Callable, Optional

import numpy as np

from dual_sampling.clients.client import (ServerInfo, VLLMClient, check_same_tokenizer,
                                          server_client)
from dual_sampling.config import SampleParams, ServerConfig
from dual_sampling.core.coordinator import (Coordinator, PromptItem, PromptQueue,
                                               SampleSettings, Sequence, StepStats)
from dual_sampling.core.transports.fused import FusedCoordinator, FusedSettings
from dual_sampling.core.transports.request import RequestTransport
from dual_sampling.core.transports.session import SessionTransport
from dual_sampling.errors import ConfigError, ServerError, ServerMismatchError
from dual_sampling.wire.session_format import PATH as SESSION_PATH

log = logging.getLogger(__name__)


def make_clients(server: ServerConfig, name: str, concurrency: int) -> list[VLLMClient]:
    """One client per replica URL (config key `name`, its API key from `<name>.api_key_env`);
    replicas are named `theta[0]`, `theta[1]`, ..."""
    urls = server.urls
    return [server_client(server, name, url=url, name=name if len(urls) == 1 else f"{name}[{i}]",
                          max_connections=2 * concurrency + 8) for i, url in enumerate(urls)]


async def preflight(thetas: list[VLLMClient], theta_infos: list[ServerInfo],
                    targets: list[VLLMClient], top_k: Optional[int]) -> list[ServerInfo]:
    """Every server answers (the thetas' infos are given, read once), all share theta[0]'s
    tokenizer and allow top_k (unless None); else a clear error. Returns each server's info
    in the order of `thetas + targets`."""
    clients = thetas + targets
    infos = theta_infos + list(await asyncio.gather(*(c.describe() for c in targets)))
    for client, info in zip(clients[1:], infos[1:]):
        await check_same_tokenizer(clients[0], infos[0], client, info)
    for replicas in (infos[:len(thetas)], infos[len(thetas):]):
        check_same_checkpoints(replicas)
    if top_k is not None:
        await asyncio.gather(*(c.check_top_k(top_k) for c in clients))
    if not infos[0].eos_token_ids:
        log.warning("theta server at %s names no EOS id: sequences end at max_tokens only",
                    clients[0].url)
    return infos


def check_same_checkpoints(replicas: list[ServerInfo]) -> None:
    """Replicas of one role serve one checkpoint: ServerMismatchError naming both URLs when
    their fingerprints differ (servers that report none are not compared)."""
    for info in replicas[1:]:
        first = replicas[0]
        for role, facts in info.checkpoints.items():
            mine = facts.get("fingerprint")
            theirs = first.checkpoints.get(role, {}).get("fingerprint")
            if mine and theirs and mine != theirs:
                raise ServerMismatchError(
                    f"the replicas {first.url} and {info.url} serve different {role} "
                    f"checkpoints ({first.checkpoints[role].get('path')} {theirs}, "
                    f"{facts.get('path')} {mine}): records would mix two models. Give "
                    f"replicas of one checkpoint.")


def sequence_record(seq: Sequence, completion: str, run_fields: dict[str, Any]
                    ) -> dict[str, Any]:
    """One dataset row: the prompt, the completion, per-token and per-sequence values, and
    `run_fields` (model names, temperature)."""
    tokens = seq.tokens
    sums = {name: _sum(tokens[name]) for name in ("logp_theta", "logp_target", "logp_q")}
    record = {
        "index": seq.item.index, "sample_index": seq.sample_index,
        "prompt": seq.item.prompt, "completion": completion,
        "prompt_token_ids": seq.item.prompt_ids, "completion_token_ids": seq.completion_ids,
        **({} if seq.item.target_prompt_ids is None else {
            "target_prompt": seq.item.target_prompt,
            "theta_prompt_token_ids": seq.item.prompt_ids,
            "target_prompt_token_ids": seq.item.target_prompt_ids}),
        **({"fields": seq.item.fields} if seq.item.fields else {}),
        "finish_reason": seq.finish_reason, "num_tokens": len(seq.completion_ids),
        **tokens,
        "sum_logp_theta": sums["logp_theta"], "sum_logp_target": sums["logp_target"],
        "sum_logp_q": sums["logp_q"],
        "log_w_theta": _diff(sums["logp_theta"], sums["logp_q"]),
        "log_w_target": _diff(sums["logp_target"], sums["logp_q"]),
        "mean_alpha": float(np.mean(tokens["alpha"])),
        **run_fields,
    }
    if seq.candidates:
        record["candidates"] = seq.candidates
    return record


def _sum(values: list[Optional[float]]) -> Optional[float]:
    """Sum of log-probabilities; null (a -inf term) makes the sum null."""
    return None if any(v is None for v in values) else float(sum(values))


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def wants_fused(params: SampleParams, theta_infos: list[ServerInfo]) -> bool:
    """True for the fused transport: asked for, or `auto` and theta.url serves the fused model.

    Raises ServerMismatchError when the servers do not fit the transport asked for, and
    ConfigError for `sample.top_k` with fused (it has no meaning there)."""
    fused = [info.fused for info in theta_infos]
    urls = [info.url for info in theta_infos]
    if any(fused) and not all(fused):
        raise ServerMismatchError(
            f"theta.url mixes fused and plain servers ({dict(zip(urls, fused))}): give the "
            f"replicas of one kind.")
    if params.transport == "fused" and not all(fused):
        raise ServerMismatchError(
            f"sample.transport=fused, but {urls} serve(s) one model: start a fused server with "
            f"./start_vllm.sh --fused --theta A --target B and point theta.url at it.")
    if params.transport in ("request", "session") and all(fused):
        raise ServerMismatchError(
            f"theta.url {urls} is a fused server (both models in one engine): use "
            f"sample.transport=fused (or auto), or two plain servers for {params.transport}.")
    use = all(fused)
    if use and params.top_k is not None:
        raise ConfigError(
            f"config key `sample.top_k` = {params.top_k} has no meaning with the fused "
            f"transport (q* covers the full vocabulary): remove it.")
    return use


def choose_transport(transport: str, infos: list[ServerInfo]) -> bool:
    """True for the session transport: asked for, or `auto` and every server has the route."""
    if transport == "request":
        return False
    has = [info.serves(SESSION_PATH) for info in infos]
    if transport == "session" and not all(has):
        missing = [info.url for info, ok in zip(infos, has) if not ok]
        raise ServerMismatchError(
            f"sample.transport=session, but the server(s) {missing} have no session route: "
            f"start them with start_vllm.sh (it loads this package's vLLM plugin) or use "
            f"sample.transport=request.")
    log.info("transport: %s", "session" if all(has) else "request")
    return all(has)


def choose_exact(params: SampleParams, infos: list[ServerInfo]) -> bool:
    """True for the exact session path (each server sends its whole next-token row, the
    coordinator samples q* over the whole vocabulary): `sample.top_k` unset, every server
    keeps full rows (start_vllm.sh's logits processor) and torch imports here. Unset top_k
    with `transport=session` insists on it; with `auto` a server without full rows, or no
    torch, falls back to the merged top-k (logged)."""
    if params.top_k is not None:
        return False
    lacking = [info.url for info in infos if not info.full_logits]
    try:
        import torch  # noqa: F401  (the fused engine's kernels run in the coordinator)
        problem = None
    except ImportError:
        problem = ("the exact session path samples with torch in this process, and torch "
                   "does not import here: pip install 'dual-sampling[exact]'")
    if lacking and problem is None:
        problem = (f"the server(s) {lacking} do not keep whole next-token rows: restart them "
                   f"with this version's start_vllm.sh (its --logits-processors)")
    if problem is None:
        if params.record_candidates:
            raise ConfigError(
                "config key `sample.record_candidates` = True stores each server's top-k "
                "lists, which the exact session path does not use: give sample.top_k=K for "
                "the top-k path, or drop record_candidates")
        log.info("transport: session, exact (q* over the whole vocabulary)")
        return True
    if params.transport == "session":
        raise ServerMismatchError(f"sample.transport=session with sample.top_k unset is the "
                                  f"exact path, but {problem}; or give sample.top_k=K for the "
                                  f"merged top-k.")
    log.warning("transport: session over the merged top-%d, not exact: %s", params.k, problem)
    return False


async def _tokenize(prompt: dict[str, Any], clients: list[VLLMClient], chat_template: bool
                    ) -> tuple[str, list[int]]:
    """(text, ids) of {"prompt"} or {"messages"}, from the first of `clients` that answers
    (each model's own tokenizer and chat template)."""
    error: Optional[ServerError] = None
    for client in clients:
        try:
            if "messages" not in prompt:
                return prompt["prompt"], await client.tokenize(prompt["prompt"])
            if chat_template:
                return (json.dumps(prompt["messages"], ensure_ascii=False),
                        await client.tokenize_chat(prompt["messages"]))
            text = "\n".join(m.get("content", "") for m in prompt["messages"])
            return text, await client.tokenize(text)
        except ServerError as exc:
            error = exc
    raise error  # type: ignore[misc]


async def tokenize_prompt(prompt: dict[str, Any], clients: list[VLLMClient],
                          chat_template: bool, target_clients: tuple[VLLMClient, ...] | list[VLLMClient] = ()
                          ) -> PromptItem:
    """Token ids of a prompt record: theta's from the first theta replica that answers, the
    target's own prompt (data.read_prompts' `target`), if any, from the target replicas."""
    text, ids = await _tokenize(prompt, clients, chat_template)
    item = PromptItem(prompt["index"], text, ids, tuple(prompt.get("sample_indices", (0,))),
                      fields=dict(prompt.get("fields") or {}))
    if prompt.get("target") is not None:
        item.target_prompt, item.target_prompt_ids = await _tokenize(
            prompt["target"], list(target_clients), chat_template)
    return item


async def generate(pairs: list[tuple[VLLMClient, ...]], queue: PromptQueue,
                   make_coordinator: Callable[..., Coordinator]) -> list[Coordinator]:
    """Run one coordinator per replica pair (fused: per replica) over the shared queue.

    A pair pulls prompts as its slots free up, so the least-loaded pair takes the next
    one, and a sample stays on its pair until it finishes. When a pair fails (a server
    error after retries), its unfinished samples (not those of their groups already
    written) go back in the queue and restart, from their first token, on the pairs still
    alive; with none left the error is raised.
    """
    alive, done = list(pairs), []
    while True:
        coordinators = [make_coordinator(*pair) for pair in alive]
        results = await asyncio.gather(*(c.run(queue) for c in coordinators),
                                       return_exceptions=True)
        await asyncio.gather(*(c.transport.aclose() for c in coordinators),
                             return_exceptions=True)
        done += coordinators
        failed = []
        for pair, coordinator, result in zip(alive, coordinators, results):
            if isinstance(result, ServerError):
                queue.requeue(coordinator.unfinished)
                failed.append((pair, result))
                log.warning("replica %s failed (%s); %d prompts restart on the others",
                            " + ".join(c.url for c in pair), result,
                            len(coordinator.unfinished))
            elif isinstance(result, BaseException):
                raise result
        alive = [pair for pair in alive if pair not in [p for p, _ in failed]]
        if queue.empty:
            return done
        if not alive:
            raise failed[-1][1]


class Sampling:
    """A dual-sampling job over open clients; see the module docstring."""

    def __init__(self, thetas: list[VLLMClient], targets: list[VLLMClient],
                 params: SampleParams, seed: int, infos: list[ServerInfo], transport: str,
                 timeout_s: float, max_retries: int, exact: bool = False) -> None:
        self.params, self.seed, self.transport = params, seed, transport
        self.exact = exact or transport == "fused"  # q* over the whole vocabulary
        self.thetas, self.targets = thetas, targets
        self.timeout_s, self.max_retries = timeout_s, max_retries
        fused = transport == "fused"
        info_theta = infos[0]
        info_target = info_theta if fused else infos[len(thetas)]
        self.info_theta, self.info_target = info_theta, info_target
        self.theta_fields = {id(c): info.theta_fields for c, info in zip(thetas, infos)}
        if fused:
            self.pairs: list[tuple[VLLMClient, ...]] = [(theta,) for theta in thetas]
        else:
            self.pairs = [(thetas[i % len(thetas)], targets[i % len(targets)])
                          for i in range(max(len(thetas), len(targets)))]
        self.max_model_len = min(info_theta.max_model_len or 1 << 30,
                                 info_target.max_model_len or 1 << 30)
        self.run_fields = {"temperature": params.temperature, **(
            {"theta_model": f"{info_theta.model}[theta]",
             "target_model": f"{info_theta.model}[target]"} if fused else
            {"theta_model": info_theta.model, "target_model": info_target.model})}
        self.settings = SampleSettings(
            top_k=None if self.exact else params.k, max_tokens=params.max_tokens,
            alpha=params.alpha, alpha_method=params.rule, alpha_min=params.alpha_min,
            alpha_max=params.alpha_max,
            missing=params.missing, concurrency=params.concurrency,
            eos_token_ids=info_theta.eos_token_ids, max_model_len=self.max_model_len,
            vocab_size=info_theta.vocab_size, stop=tuple(params.stop), seed=seed,
            record_candidates=params.record_candidates, temperature=params.temperature)

    @classmethod
    async def open(cls, thetas: list[VLLMClient], targets: list[VLLMClient],
                   params: SampleParams, *, seed: int = 0, timeout_s: float = 120.0,
                   max_retries: int = 2) -> "Sampling":
        """Check the servers and choose the transport (targets are unused when theta.url is
        a fused server); ServerError / ServerMismatchError / ConfigError say what is wrong."""
        for client in thetas:  # a pin left by an earlier job would refuse /tokenize
            client.unpin_theta()
        theta_infos = list(await asyncio.gather(*(c.describe() for c in thetas)))
        fused = wants_fused(params, theta_infos)
        targets = [] if fused else targets
        if not fused and not targets:
            raise ConfigError("config key `target.url` is not set: the request and session "
                              "transports need a target server (or point theta.url at a "
                              "fused server)")
        infos = await preflight(thetas, theta_infos, targets, None if fused else params.top_k)
        for client, info in zip(thetas, infos):
            client.pin_theta(info)
        exact = fused
        if fused:
            transport = "fused"
            log.info("transport: fused (both models in the engine at %s; target.url unused)",
                     [c.url for c in thetas])
        else:
            transport = "session" if choose_transport(params.transport, infos) else "request"
            exact = transport == "session" and choose_exact(params, infos)
            if not exact and params.top_k is None:  # the default k, not checked above
                await asyncio.gather(*(c.check_top_k(params.k) for c in thetas + targets))
        return cls(thetas, targets, params, seed, infos, transport, timeout_s, max_retries,
                   exact=exact)

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """`{"theta": ..., "target": ...}`, each `{"model", "path", "fingerprint"}` (theta also
        `theta_version`): what served the records, for run_params.json. Replicas serve one
        checkpoint (checked in `open`), so the first of each role speaks for all."""
        fused = self.transport == "fused"
        keys = {"theta": "theta" if fused else "model", "target": "target" if fused else "model"}
        infos = {"theta": self.info_theta, "target": self.info_target}
        models = {role: {"model": infos[role].model, **infos[role].checkpoints.get(key, {})}
                  for role, key in keys.items()}
        models["theta"]["theta_version"] = self.info_theta.theta_version
        return models

    @property
    def theta_versions(self) -> list[Optional[int]]:
        return [fields["theta_version"] for fields in self.theta_fields.values()]

    async def run(self, prompts: list[dict[str, Any]], on_record: Callable[[dict], None], *,
                  chat_template: bool = False,
                  on_step: Optional[Callable[[StepStats], None]] = None
                  ) -> list[Coordinator | FusedCoordinator]:
        """Sample every (prompt, sample_index) asked for; each record goes to `on_record` as
        soon as its sample finishes. Returns the coordinators (their wait/total seconds)."""
        params = self.params

        def make_coordinator(theta: VLLMClient, target: Optional[VLLMClient] = None
                             ) -> Coordinator | FusedCoordinator:
            fields = {**self.run_fields, **self.theta_fields[id(theta)]}

            async def on_finished(seq: Sequence) -> None:
                completion = await theta.detokenize(seq.completion_ids)
                on_record(sequence_record(seq, completion, fields))

            if self.transport == "fused":
                return FusedCoordinator(theta, FusedSettings(
                    max_tokens=params.max_tokens, alpha=params.alpha,
                    concurrency=params.concurrency, max_model_len=self.max_model_len,
                    temperature=params.temperature, stop=tuple(params.stop), seed=self.seed,
                    alpha_method=params.rule, alpha_min=params.alpha_min,
                    alpha_max=params.alpha_max),
                    on_finished, on_step=on_step)
            per_token = (SessionTransport(theta, target, timeout_s=self.timeout_s,
                                          max_retries=self.max_retries)
                         if self.transport == "session" else RequestTransport(theta, target))
            return Coordinator(per_token, self.settings, on_finished, on_step=on_step,
                               detokenize=theta.detokenize)

        if self.transport == "fused" and any(p.get("target") is not None for p in prompts):
            raise ConfigError(
                "the prompts give the target its own prompt (target_prompt, target_messages "
                "or data.target_template), which one fused engine cannot read: both models "
                "share one token stream there. Serve the two models on two servers "
                "(sample.transport=session).")
        queue = PromptQueue(prompts, partial(tokenize_prompt, clients=self.thetas,
                                             target_clients=self.targets,
                                             chat_template=chat_template),
                            lookahead=2 * params.concurrency)
        return await generate(self.pairs, queue, make_coordinator)
