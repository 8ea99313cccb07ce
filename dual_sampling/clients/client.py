"""One vLLM OpenAI-compatible server over HTTP: what it serves, tokenisation, start-up guards.

`VLLMClient` is the one client the modes use: HTTP and retries come from
`dual_sampling.clients.http_client` (the retry policy is documented there), logprob requests from
`dual_sampling.clients.logprob_client`; this module adds the server's facts (`describe`), tokenising
through the server, and the check that two servers share a tokenizer. `server_client` makes
the client of a configured server (`theta`, `teacher`, ...), with its API key.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from dual_sampling.clients.http_client import _field, _is_missing_route
from dual_sampling.clients.logprob_client import TOPK_PATH, LogprobClient  # noqa: F401
from dual_sampling.errors import (CheckpointRefusedError, MalformedResponseError, ServerError,
                                  ServerMismatchError)
from dual_sampling.wire.theta_format import PATH as LOAD_THETA_PATH
from dual_sampling.wire.theta_format import PIN_HEADER

if TYPE_CHECKING:
    from dual_sampling.config import ServerConfig

INFO_PATH = "/v1/dual_sampling/info"  # this package's plugin (dual_sampling/vllm_plugin/info.py)



@dataclass(frozen=True)
class ServerInfo:
    """What a server says about itself, read once before any generation."""

    url: str
    model: str
    max_model_len: int
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    vocab_size: Optional[int]
    has_plugin: bool
    routes: tuple[str, ...] = ()  # the paths this package's plugin serves there
    fused: bool = False  # serves theta and target in one engine (start_vllm.sh --fused)
    full_logits: bool = False  # its session route gives whole rows (the exact transport)
    theta_version: Optional[int] = None  # load_theta's count on this server (0: as started)
    theta_path: Optional[str] = None  # the checkpoint it serves now
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    """{role: {"path", "fingerprint"}} (plugin: `theta`/`target` fused, else `model`); a
    server without the plugin: `model` with `/v1/models`' root and no fingerprint."""

    @property
    def theta_fields(self) -> dict[str, Any]:
        """What records say about the policy they came from."""
        return {"theta_version": self.theta_version, "theta_path": self.theta_path}

    def serves(self, path: str) -> bool:
        return path in self.routes


class VLLMClient(LogprobClient):
    """Async client for one server. Use as `async with VLLMClient(url, name=...) as c:`."""

    # -- server facts --------------------------------------------------------------------
    async def describe(self) -> ServerInfo:
        """Read model name, limits and special-token ids; fill in `self.model`."""
        models = await self.request("GET", "/v1/models")
        try:
            entries = models["data"]
            served = [m["id"] for m in entries]
        except (KeyError, TypeError) as exc:
            raise MalformedResponseError(
                f"{self._where('GET', '/v1/models')} answered {str(models)[:200]}: "
                f"no model list. Is this URL a vLLM server?") from exc
        if self.model is None:
            self.model = served[0]
        elif self.model not in served:
            raise ServerMismatchError(
                f"{self.name} server at {self.url} serves {served}, not {self.model!r}: "
                f"fix `{self.name}.model` or point `{self.name}.url` at the right server.")
        entry = entries[served.index(self.model)]
        max_model_len = int(entry.get("max_model_len") or 0)
        info = await self._special_tokens()
        if not info.get("checkpoints"):  # no plugin: vLLM's own word for what it loaded
            info["checkpoints"] = {"model": {"path": entry.get("root"), "fingerprint": None}}
        return ServerInfo(url=self.url, model=self.model, max_model_len=max_model_len, **info)

    async def _special_tokens(self) -> dict[str, Any]:
        """BOS/EOS ids and vocab size: from this package's plugin route when the server has it,
        otherwise from vLLM's `/tokenizer_info` (start the server with
        `--enable-tokenizer-info-endpoint`; start_vllm.sh does)."""
        try:
            facts = await self.request("GET", INFO_PATH, max_retries=0)
            return {"bos_token_id": facts["bos_token_id"],
                    "eos_token_ids": tuple(facts["eos_token_ids"]),
                    "vocab_size": facts["vocab_size"], "has_plugin": True,
                    "routes": tuple(facts.get("routes", ())),
                    "fused": bool(facts.get("fused", False)),
                    "full_logits": bool(facts.get("full_logits", False)),
                    "theta_version": facts.get("theta_version"),
                    "theta_path": facts.get("theta_path"),
                    "checkpoints": dict(facts.get("checkpoints") or {})}
        except ServerError:
            pass
        try:
            tok = await self.request("GET", "/tokenizer_info", max_retries=0)
        except ServerError as exc:
            raise ServerMismatchError(
                f"{self.name} server at {self.url} tells neither its EOS id nor its vocab: "
                f"start it with this package's plugin (`./start_vllm.sh`) or with vLLM's "
                f"`--enable-tokenizer-info-endpoint`.") from exc
        bos = await self._token_id(tok.get("bos_token"))
        eos = await self._token_id(tok.get("eos_token"))
        return {"bos_token_id": bos, "eos_token_ids": () if eos is None else (eos,),
                "vocab_size": tok.get("vocab_size"), "has_plugin": False}

    async def _token_id(self, token: Any) -> Optional[int]:
        if isinstance(token, dict):
            token = token.get("content")
        if not token:
            return None
        ids = await self.tokenize(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    # -- the served policy (vllm_plugin/theta_route.py) ------------------------------------
    def pin_theta(self, info: ServerInfo) -> None:
        """Send every request pinned to `info`'s theta_version: once the server loads another
        theta, requests fail with ThetaChangedError instead of mixing two policies."""
        if info.theta_version is not None:
            self.headers[PIN_HEADER] = str(info.theta_version)

    def unpin_theta(self) -> None:
        self.headers.pop(PIN_HEADER, None)

    async def load_theta(self, path: str) -> dict[str, Any]:
        """Load the checkpoint at `path` (on the server's machine) as the server's theta.

        Returns `{"theta_version", "theta_path", "load_s"}` and re-pins this client to the
        new version. Raises CheckpointRefusedError (the server keeps its weights) when the
        checkpoint does not fit, ServerError when the server lacks the route."""
        try:
            reply = await self.request("POST", LOAD_THETA_PATH, {"path": str(path)},
                                       max_retries=0)
        except ServerError as exc:
            if "HTTP 422" in str(exc) or "HTTP 409" in str(exc):
                raise CheckpointRefusedError(str(exc)) from exc
            if _is_missing_route(exc):
                raise ServerError(f"{self.name} server at {self.url} has no load_theta "
                                  f"route: start it with ./start_vllm.sh (this package's "
                                  f"plugin)") from exc
            raise
        version = _field(reply, "theta_version", self._where("POST", LOAD_THETA_PATH))
        if PIN_HEADER in self.headers:
            self.headers[PIN_HEADER] = str(version)
        return reply

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        reply = await self.post("/tokenize", {"prompt": text,
                                             "add_special_tokens": add_special_tokens})
        return _field(reply, "tokens", self._where("POST", "/tokenize"))

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render chat `messages` with the served model's chat template, then tokenise."""
        reply = await self.post("/tokenize", {"messages": messages,
                                             "add_generation_prompt": True,
                                             "add_special_tokens": False})
        return _field(reply, "tokens", self._where("POST", "/tokenize"))

    async def detokenize(self, token_ids: list[int]) -> str:
        reply = await self.post("/detokenize", {"tokens": token_ids})
        return _field(reply, "prompt", self._where("POST", "/detokenize"))


def server_client(server: ServerConfig, key: str, *, url: Optional[str] = None,
                  name: Optional[str] = None, max_connections: int = 64) -> VLLMClient:
    """The client of the server configured under config key `key` (`theta`, `teacher`, ...):
    `url` (one replica; default `server.url`), named `name` (default `key`), with the API key
    read from the environment variable named by `<key>.api_key_env` (unset or empty: none)."""
    return VLLMClient(url or server.url, name=name or key, model=server.model,
                      timeout_s=server.timeout_s, max_retries=server.max_retries,
                      max_connections=max_connections,
                      api_key=server.api_key,
                      api_key_hint=f"set the environment variable {server.api_key_env} "
                                   f"(named by `{key}.api_key_env`) to it")


async def check_same_tokenizer(a: VLLMClient, info_a: ServerInfo, b: VLLMClient,
                               info_b: ServerInfo, probe: str = "Hello, world! 123 <s> ünï") -> None:
    """Two servers must tokenise alike: same vocab size, BOS/EOS ids and ids for a probe."""
    ids_a, ids_b = await asyncio.gather(a.tokenize(probe), b.tokenize(probe))
    problems = []
    if info_a.vocab_size != info_b.vocab_size:
        problems.append(f"vocab size {info_a.vocab_size} vs {info_b.vocab_size}")
    if info_a.bos_token_id != info_b.bos_token_id:
        problems.append(f"BOS id {info_a.bos_token_id} vs {info_b.bos_token_id}")
    if set(info_a.eos_token_ids) != set(info_b.eos_token_ids):
        problems.append(f"EOS ids {info_a.eos_token_ids} vs {info_b.eos_token_ids}")
    if ids_a != ids_b:
        problems.append(f"ids for {probe!r}: {ids_a[:12]} vs {ids_b[:12]}")
    if problems:
        raise ServerMismatchError(
            f"{a.name} server at {a.url} and {b.name} server at {b.url} use different "
            f"tokenizers ({'; '.join(problems)}). Dual sampling needs one shared vocabulary: "
            f"serve two models with the same tokenizer.")
