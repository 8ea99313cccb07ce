"""The fused engine's contract, in one place for the server and its clients: the routes'
paths, the generate request body, the per-request arguments the route hands the engine
(`SamplingParams.extra_args[EXTRA_KEY]`: `TokenArgs`, which checks itself as vLLM's
`SamplingParams` does), and the per-token fields of a reply. The route
(vllm_plugin/fused/route.py), the engine's sampler and speculative verify step
(fused/sampler.py, fused/speculate.py), its stock-request check (fused/stock.py), the client
transport (transports/fused.py) and the tests all read these; no vLLM import here.

    POST GENERATE_PATH {"prompts": [[ids...], ...], "seeds": [int, ...], "max_tokens": 64,
                        "alpha": null | 0.3, "temperature": 1.0, "stop": [],
                        "ignore_eos": false, "alpha_method": "kl_symmetry",
                        "alpha_min": 0.0, "alpha_max": 1.0}
    -> {"results": [{"token_ids": [...], "finish_reason": "stop" | "length",
                     <TOKEN_FIELDS>: [one float per token]}, ...]}   (prompt order)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from dual_sampling.maths.mixture import ALPHA_METHODS, TOKEN_FIELDS

GENERATE_PATH = "/v1/dual_sampling/fused/generate"
COUNTERS_PATH = "/v1/dual_sampling/fused/counters"
ENGINE_PATH = "/v1/dual_sampling/fused/engine"
EXTRA_KEY = "dual_sampling_fused"  # SamplingParams.extra_args key of fused requests

DEFAULT_RULE = ("kl_symmetry", 0.0, 1.0)


class TokenArgsError(ValueError):
    """A fused request's argument out of range: `parameter` names it (a 400 on the server)."""

    def __init__(self, message: str, parameter: str, value: Any) -> None:
        super().__init__(message)
        self.parameter, self.value = parameter, value


@dataclass(frozen=True)
class TokenArgs:
    """How the engine chooses one request's tokens: q* by its alpha rule at its temperature,
    each token's uniform from (seed, position); `tag` keys the request's record."""

    tag: Optional[str]
    seed: int
    alpha: Optional[float] = None  # None: by alpha_method; a number: fixed
    temperature: float = 1.0  # 0: argmax of q*
    alpha_method: str = "kl_symmetry"
    alpha_min: float = 0.0
    alpha_max: float = 1.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """TokenArgsError naming the first argument out of range."""
        where = f"extra_args.{EXTRA_KEY}"
        if not (self.tag is None or isinstance(self.tag, str)) or not isinstance(self.seed, int) \
                or isinstance(self.seed, bool):
            raise TokenArgsError(f"{where} needs a string `tag` and an integer `seed`, got "
                                 f"tag={self.tag!r}, seed={self.seed!r}", where, asdict(self))
        for name, low, high in (("alpha", 0.0, 1.0), ("temperature", 0.0, None),
                                ("alpha_min", 0.0, 1.0), ("alpha_max", 0.0, 1.0)):
            value = getattr(self, name)
            if value is None and name == "alpha":
                continue
            if not _number_in(value, low, high):
                wanted = f"in [{low}, {high}]" if high is not None else f">= {low}"
                extra = " (null: chosen per token by alpha_method)" if name == "alpha" else ""
                raise TokenArgsError(f"{where}.{name} = {value!r}: give a number {wanted}{extra}",
                                     name, value)
        if self.alpha_method not in ALPHA_METHODS:
            raise TokenArgsError(f"{where}.alpha_method = {self.alpha_method!r}: choose "
                                 f"{', '.join(ALPHA_METHODS)}", "alpha_method", self.alpha_method)
        if self.alpha_method == "fixed" and self.alpha is None:
            raise TokenArgsError(f"{where}: alpha_method fixed needs alpha", "alpha", None)
        if self.alpha is not None and self.alpha_method not in ("kl_symmetry", "fixed"):
            raise TokenArgsError(f"{where}: alpha fixes alpha, which alpha_method "
                                 f"{self.alpha_method} would choose: give one of them",
                                 "alpha_method", self.alpha_method)
        if self.alpha_min > self.alpha_max:
            raise TokenArgsError(f"{where}: alpha_min {self.alpha_min} > alpha_max "
                                 f"{self.alpha_max}", "alpha_min", self.alpha_min)

    def rule_fields(self) -> dict[str, Any]:
        """The alpha-rule fields of a generate body: none for the default rule, so a server
        of an earlier version serves default runs as before."""
        if (self.alpha_method, self.alpha_min, self.alpha_max) == DEFAULT_RULE:
            return {}
        return {"alpha_method": self.alpha_method, "alpha_min": self.alpha_min,
                "alpha_max": self.alpha_max}

    def to_extra(self) -> dict[str, dict[str, Any]]:
        """`SamplingParams.extra_args` carrying these arguments into the engine."""
        return {EXTRA_KEY: asdict(self)}

    @classmethod
    def from_extra(cls, extra_args: Optional[dict[str, Any]]) -> Optional["TokenArgs"]:
        """The arguments a request carries (None: not a fused request); TokenArgsError when
        they are malformed or out of range."""
        args = (extra_args or {}).get(EXTRA_KEY)
        if args is None:
            return None
        if not isinstance(args, dict):
            raise TokenArgsError(f"extra_args.{EXTRA_KEY} must be an object, got {args!r}",
                                 f"extra_args.{EXTRA_KEY}", args)
        known = {name: args[name] for name in cls.__dataclass_fields__ if name in args}
        if "tag" not in known or "seed" not in known:
            raise TokenArgsError(f"extra_args.{EXTRA_KEY} needs a string `tag` and an integer "
                                 f"`seed`, got {args!r}", f"extra_args.{EXTRA_KEY}", args)
        return cls(**known)


def _number_in(value: Any, low: float, high: Optional[float]) -> bool:
    if isinstance(value, bool):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number >= low and (high is None or number <= high)


def generate_body(prompts: list[list[int]], seeds: list[int], max_tokens: int,
                  args: Optional[TokenArgs] = None, stop: Any = (),
                  ignore_eos: bool = False) -> dict[str, Any]:
    """The POST GENERATE_PATH body: `args` (tag and seed unused: one seed per prompt) gives
    alpha, temperature and the alpha rule."""
    args = TokenArgs(tag=None, seed=0) if args is None else args
    return {"prompts": prompts, "seeds": seeds, "max_tokens": max_tokens, "alpha": args.alpha,
            "temperature": args.temperature, "stop": list(stop), "ignore_eos": ignore_eos,
            **args.rule_fields()}


def read_result(result: Any) -> tuple[list[int], dict[str, list[float]], str]:
    """(token ids, TOKEN_FIELDS' per-token lists, finish reason) of one reply result;
    ValueError when it is malformed or a list's length is not the completion's."""
    try:
        ids = [int(t) for t in result["token_ids"]]
        fields = {name: [float(v) for v in result[name]] for name in TOKEN_FIELDS}
        finish = str(result["finish_reason"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"not a fused result ({exc!r}): {str(result)[:200]}") from None
    if not ids or any(len(values) != len(ids) for values in fields.values()):
        raise ValueError(f"{len(ids)} tokens with per-token lists of other lengths")
    return ids, fields, finish


SPECULATE_HELP = "give K (draft tokens a step, 0 = off) or K:B (only while at most B " \
                 "requests run), e.g. 4 or 4:8"


def parse_speculate(value: Any) -> tuple[int, int]:
    """The fused engine's speculation setting (start_vllm.sh --speculate, server.speculate):
    `K` or `K:B` (draft K tokens a step while at most B requests are in the batch) ->
    (K, B or 0); ValueError (SPECULATE_HELP) on anything else."""
    parts = str(value).split(":")
    if not (1 <= len(parts) <= 2 and all(p.isdigit() for p in parts)) \
            or (len(parts) == 2 and int(parts[1]) < 1):
        raise ValueError(f"{value!r}: {SPECULATE_HELP}")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
