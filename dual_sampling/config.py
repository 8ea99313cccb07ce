"""Typed config schemas for the modes, registered in Hydra's ConfigStore.

`conf/config.yaml` picks a mode (`mode=sample|topk|perplexity|score`); each
`conf/mode/*.yaml` extends the schema stored here under the same group, so Hydra type-checks
overrides at compose time, and `to_run_config` turns the composed config into these
dataclasses, whose `__post_init__` calls each section's `check(key)`, which raises
`ConfigError` naming the key and the bad value.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dual_sampling.errors import ConfigError
from dual_sampling.maths.mixture import ALPHA_METHODS
from dual_sampling.wire.fused_format import SPECULATE_HELP, parse_speculate

MISSING_POLICIES = ("kth", "uniform_rest", "floor")
TRANSPORTS = ("auto", "request", "session", "fused")
DEFAULT_TOP_K = 20
TOPK_DTYPES = ("int8", "fp16", "bf16")
SCORE_ROUTES = ("auto", "topk", "stock")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}` = {value!r} is invalid: {what}. "
                          f"Fix it on the command line (`{key}=...`) or in conf/.")


@dataclass
class ServerConfig:
    """One vLLM OpenAI-compatible server (sample mode: or a list of replicas of one model)."""

    url: Any = "http://127.0.0.1:8000"
    """Base URL without `/v1`; in sample mode also a list of replicas (`theta.url=[u1,u2]`)."""
    model: Optional[str] = None
    """Served model name; None takes the first entry of `/v1/models`."""
    timeout_s: float = 120.0
    """Per-request timeout in seconds (connect + read)."""
    max_retries: int = 2
    """Retries on connection errors, timeouts, 408, 429 and 5xx (never other 4xx)."""
    api_key_env: str = "VLLM_API_KEY"
    """NAME of the environment variable that holds this server's API key (unset or empty:
    no key sent); the key itself never enters the config, its logs or `.hydra/`."""

    @property
    def api_key(self) -> Optional[str]:
        """This server's API key: the value of the variable `api_key_env` (unset or empty: None)."""
        return os.environ.get(self.api_key_env) or None

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    def check(self, key: str) -> None:
        _require(len(self.urls) >= 1, f"{key}.url", self.url, "give at least one URL")
        for url in self.urls:
            _require(isinstance(url, str) and url.startswith(("http://", "https://")),
                     f"{key}.url", url, "must start with http:// or https://")
        _require(self.timeout_s > 0, f"{key}.timeout_s", self.timeout_s, "must be > 0")
        _require(self.max_retries >= 0, f"{key}.max_retries", self.max_retries, "must be >= 0")
        name = self.api_key_env
        if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
            # the value is not echoed: a key given here by mistake stays out of the logs
            raise ConfigError(f"config key `{key}.api_key_env` is invalid: it names the "
                              f"environment variable holding the key (letters, digits and _, "
                              f"such as VLLM_API_KEY), never the key itself. Fix it on the "
                              f"command line (`{key}.api_key_env=...`) or in conf/.")


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    mode: str = "offline"
    """offline writes run files under `dir`; online needs `wandb login`; disabled logs nothing."""
    project: str = "dual_sampling"
    """W&B project the runs go to."""
    entity: Optional[str] = None
    """W&B team or user; None: the logged-in user's default entity."""
    name: Optional[str] = None
    """Run name; None lets W&B choose."""
    dir: Optional[str] = None
    """Where W&B writes its files; None puts them in `output_dir`."""
    tags: list[str] = field(default_factory=list)
    """Tags on the W&B run (e.g. `wandb.tags=[alpha-sweep]`)."""
    group: Optional[str] = None
    """W&B group; None in a multirun puts the jobs of one run in one group (the run dir's name)."""
    log_every: int = 8
    """Log per-step metrics every this many coordinator steps."""

    def check(self, key: str) -> None:
        _require(self.mode in ("offline", "online", "disabled"), f"{key}.mode", self.mode,
                 "choose offline, online or disabled")
        _require(self.log_every >= 1, f"{key}.log_every", self.log_every, "must be >= 1")


@dataclass
class ShardedInputConfig:
    """What every input config shares: a limit and a shard of the items."""

    limit: Optional[int] = None
    """Use only the first N items (after sharding)."""
    shard_index: int = 0
    """This job's shard, in [0, num_shards): items shard_index, shard_index + num_shards, ..."""
    num_shards: int = 1
    """How many jobs share the items (each takes every num_shards-th item)."""

    def check(self, key: str) -> None:
        _require(self.limit is None or self.limit >= 1, f"{key}.limit", self.limit, "must be >= 1")
        _require(self.num_shards >= 1, f"{key}.num_shards", self.num_shards, "must be >= 1")
        _require(0 <= self.shard_index < self.num_shards, f"{key}.shard_index", self.shard_index,
                 f"must be in [0, {key}.num_shards={self.num_shards})")


@dataclass
class FieldNames:
    """The dataset's column for each name the prompt reader and the templates use (each
    column is renamed to its name before a row is read; the other columns keep theirs)."""

    prompt: Optional[str] = None
    """The column read as `prompt` (None: data.prompt_field)."""
    messages: str = "messages"
    """The column read as chat `messages`."""
    problem: str = "problem"
    """The column a template's {problem} reads."""
    solution: str = "solution"
    """The column a template's {solution} reads (a reference answer or hint)."""

    def as_dict(self) -> dict[str, str]:
        return {name: column for name, column in vars(self).items() if column}


@dataclass
class PromptDataConfig(ShardedInputConfig):
    """Prompts for sample mode."""

    prompts: str = "???"
    """A JSONL file (a `prompt` field, or chat `messages`) or a plain text file, one prompt a line."""
    prompt_field: str = "prompt"
    """The JSONL field that holds a prompt's text (records with `messages` use those)."""
    chat_template: bool = True
    """Render `messages` records with the model's chat template."""
    theta_template: Optional[str] = None
    """theta's prompt built from the row's fields, e.g. "{problem}" (rows with
    theta_prompt/theta_messages use those); None: `prompt_field` or `messages`."""
    target_template: Optional[str] = None
    """The target's own prompt from the row's fields, e.g. "{problem}\n\n## Hint\n{solution}"
    (a teacher that sees the solution; rows with target_prompt/target_messages use those);
    None: the target reads theta's prompt. Two servers only (session, request)."""
    theta_chat: bool = True
    """Render theta_template's text as one user message through theta's chat template
    (false: plain text, for a base model: "Question: {problem}\nAnswer:")."""
    target_chat: bool = True
    """The same for target_template, through the target's chat template."""
    fields: FieldNames = field(default_factory=FieldNames)
    """Dataset columns by the names templates use: data.fields.solution=answer reads the
    `answer` column as {solution}."""

    def check(self, key: str) -> None:
        _require(self.prompts not in ("", "???"), f"{key}.prompts", self.prompts,
                 f"give a prompt file: {key}.prompts=path/to/prompts.jsonl")
        _require(Path(self.prompts).exists(), f"{key}.prompts", self.prompts,
                 "file not found (a JSONL, Parquet or text file, or a datasets folder)")
        _require(self.fields.prompt is None or self.prompt_field == "prompt",
                 f"{key}.fields.prompt", self.fields.prompt,
                 f"give the prompt's column once: {key}.fields.prompt or {key}.prompt_field, "
                 f"not both")
        super().check(key)


@dataclass
class SampleParams:
    """How each token is chosen."""

    top_k: Optional[int] = None
    """Next-token candidates asked of each server per step: q* over their merged top-k.
    Unset: the session transport is exact (each server sends its whole next-token row; q*
    over the full vocabulary) and the request transport asks for 20. Must stay unset with
    the fused transport, whose q* covers the full vocabulary."""
    max_tokens: int = 64
    """Completion length cap."""
    alpha: Optional[float] = None
    """None solves alpha* per token; a number in [0,1] fixes it (0 = theta, 1 = target)."""
    alpha_method: str = "kl_symmetry"
    """How alpha is chosen per token: kl_symmetry (the Chernoff point, KL(q||theta) =
    KL(q||target)), ess_balance (the importance weights to each model have equal ESS: sum
    theta^2/q = sum target^2/q), entropy (H(theta) / (H(theta) + H(target)), no solve) or
    fixed (`sample.alpha`; a set alpha with kl_symmetry means fixed too)."""
    alpha_min: float = 0.0
    """Lower clamp of the chosen alpha (the optimal_sampling package uses 0.5)."""
    alpha_max: float = 1.0
    """Upper clamp of the chosen alpha."""
    missing: str = "kth"
    """Logprob given to a candidate one server did not return: kth, uniform_rest or floor."""
    concurrency: int = 32
    """Sequences in flight per replica pair (one batched request per server per step)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings, checked on the detokenised completion."""
    transport: str = "auto"
    """How a step reaches the servers: `fused` (both models in one vLLM engine started with
    start_vllm.sh --fused at theta.url; whole completions from the exact full-vocabulary q*;
    target.url unused), `session` (resident vLLM sessions over one WebSocket per server;
    needs this package's plugin; exact with top_k unset, else the merged top-k), `request`
    (a /v1/completions request per step; any vLLM server; the merged top-k), or `auto`
    (fused when theta.url serves the fused model, else session when every server has the
    plugin's session route, else request)."""
    record_candidates: bool = False
    """Also store both servers' top-k lists per token (large; for audits and tests; needs
    top_k: the exact session path has no lists)."""
    n: int = 1
    """Completions per prompt (a group, for GRPO/RLOO, best-of-n, preference pairs): records
    `(index, sample_index)` for sample_index in [0, n), each from its own seeded stream."""
    temperature: float = 1.0
    """Each token is drawn from q_T = q*^(1/T) / sum q*^(1/T) over the merged candidates, with
    alpha* the Chernoff point of the untempered pair; `logp_q` is log q_T of the token, and
    `logp_theta`/`logp_target` stay untempered. 1 reproduces untempered datasets exactly."""
    report: bool = True
    """Write `output_dir/report.html` (plots of the whole dataset) at the end of the run."""

    def check(self, key: str) -> None:
        _require(self.top_k is None or self.top_k >= 1, f"{key}.top_k", self.top_k,
                 "must be >= 1 (or null: 20)")
        _require(self.top_k is None or self.transport != "fused", f"{key}.top_k", self.top_k,
                 f"has no meaning with {key}.transport=fused (q* covers the full vocabulary): "
                 f"remove it")
        _require(self.max_tokens >= 1, f"{key}.max_tokens", self.max_tokens, "must be >= 1")
        _require(self.alpha is None or 0.0 <= self.alpha <= 1.0, f"{key}.alpha", self.alpha,
                 "must be null (solve per token) or in [0, 1]")
        _require(self.alpha_method in ALPHA_METHODS, f"{key}.alpha_method",
                 self.alpha_method, f"choose one of {ALPHA_METHODS}")
        _require(self.alpha_method != "fixed" or self.alpha is not None,
                 f"{key}.alpha_method", self.alpha_method, f"fixed needs {key}.alpha=A")
        _require(self.alpha is None or self.alpha_method in ("kl_symmetry", "fixed"),
                 f"{key}.alpha", self.alpha, f"fixes alpha, which {key}.alpha_method="
                 f"{self.alpha_method} would choose: give one of them")
        _require(0.0 <= self.alpha_min <= self.alpha_max <= 1.0, f"{key}.alpha_min",
                 self.alpha_min, f"needs 0 <= alpha_min <= alpha_max ({self.alpha_max}) <= 1")
        _require(self.missing in MISSING_POLICIES, f"{key}.missing", self.missing,
                 f"choose one of {MISSING_POLICIES}")
        _require(self.concurrency >= 1, f"{key}.concurrency", self.concurrency, "must be >= 1")
        _require(self.transport in TRANSPORTS, f"{key}.transport", self.transport,
                 f"choose one of {TRANSPORTS}")
        _require(self.n >= 1, f"{key}.n", self.n, "must be >= 1")
        _require(math.isfinite(self.temperature) and self.temperature > 0,
                 f"{key}.temperature", self.temperature, "must be a finite number > 0")

    @property
    def rule(self) -> str:
        """The alpha rule that runs: `fixed` whenever alpha is set."""
        return "fixed" if self.alpha is not None else self.alpha_method

    @property
    def k(self) -> int:
        """top_k with its default: the candidates a per-token transport asks for."""
        return DEFAULT_TOP_K if self.top_k is None else self.top_k


LAUNCH_KINDS = ("none", "fused", "pair")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ServerLaunchConfig:
    """The engine a job starts for itself (dual_sampling/serving/self_serve.py), on the devices its
    scheduler gave it (CUDA_VISIBLE_DEVICES from SLURM or Ray), stopped on every way out."""

    launch: str = "none"
    """`none`: use running servers at theta.url/target.url; `fused`: start one engine with
    both models (start_vllm.sh --fused); `pair`: start a theta and a target server."""
    theta: Optional[str] = None
    """theta's checkpoint (a local directory or a hub name the nodes can read)."""
    target: Optional[str] = None
    """The target's checkpoint."""
    tp: int = 1
    """Tensor-parallel size of each engine (start_vllm.sh --tp)."""
    device: str = "auto"
    """`cuda`, `cpu` (start_vllm.sh --cpu), or `auto`: cuda when a GPU is visible."""
    max_model_len: Optional[int] = None
    """Context length of the engines (None: the model's)."""
    timeout_s: int = 900
    """How long to wait for the engine to answer before giving up."""
    extra_args: list[str] = field(default_factory=list)
    """More vLLM arguments, e.g. `[--gpu-memory-utilization,0.85]`."""
    speculate: str = "0"
    """launch=fused only: theta drafts K tokens a step (`K`, or `K:B`: only while at most B
    requests run), the tokens still exactly q*'s (start_vllm.sh --speculate); 0 = off."""

    def check(self, key: str) -> None:
        _require(self.launch in LAUNCH_KINDS, f"{key}.launch", self.launch,
                 f"choose one of {LAUNCH_KINDS}")
        try:
            parse_speculate(self.speculate)
        except ValueError:
            _require(False, f"{key}.speculate", self.speculate, SPECULATE_HELP)
        _require(str(self.speculate) == "0" or self.launch == "fused", f"{key}.speculate",
                 self.speculate, f"speculation is the fused engine's: set {key}.launch=fused")
        if self.launch != "none":
            for role in ("theta", "target"):
                _require(bool(getattr(self, role)), f"{key}.{role}", getattr(self, role),
                         f"{key}.launch={self.launch} starts an engine with both models: "
                         f"give {key}.theta=CHECKPOINT {key}.target=CHECKPOINT")
        _require(self.tp >= 1, f"{key}.tp", self.tp, "must be >= 1")
        _require(self.device in DEVICES, f"{key}.device", self.device, f"choose one of {DEVICES}")
        _require(self.max_model_len is None or self.max_model_len >= 16, f"{key}.max_model_len",
                 self.max_model_len, "must be >= 16 (or null: the model's)")
        _require(self.timeout_s > 0, f"{key}.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class RunConfig:
    """What every mode shares."""

    mode_name: str = "???"
    """Set by the mode's config (`mode=sample|topk|perplexity|score`), not by hand."""
    output_dir: str = "???"
    """Everything a run writes; a run started again with the same dir resumes."""
    seed: int = 0
    """Seed of every random draw (sample mode: with the prompt index and sample_index, it
    decides a sample's tokens)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    """Show a progress bar."""

    replica_keys: ClassVar[tuple[str, ...]] = ()
    """Server keys that accept a list of replica URLs; the others take one URL."""

    def __post_init__(self) -> None:
        _require(self.output_dir not in ("", "???"), "output_dir", self.output_dir,
                 "give an output directory")
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "check"):
                value.check(f.name)
            if isinstance(value, ServerConfig) and f.name not in self.replica_keys:
                _require(len(value.urls) == 1, f"{f.name}.url", value.url,
                         "this mode takes one server URL")
                value.url = value.urls[0]


@dataclass
class SampleRunConfig(RunConfig):
    """`mode=sample`: dual sampling with a policy `theta` and a `target`."""

    mode_name: str = "sample"
    replica_keys: ClassVar[tuple[str, ...]] = ("theta", "target")
    theta: ServerConfig = field(default_factory=ServerConfig)
    target: ServerConfig = field(default_factory=lambda: ServerConfig(url="http://127.0.0.1:8001"))
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    sample: SampleParams = field(default_factory=SampleParams)
    server: ServerLaunchConfig = field(default_factory=ServerLaunchConfig)
    """An engine this job starts for itself (`server.launch=fused|pair`) instead of theta.url
    and target.url."""


@dataclass
class SequenceDataConfig(ShardedInputConfig):
    """Inputs for topk and perplexity: JSONL (`text` or `token_ids`) or text files."""

    path: Any = None
    """One file (`data.path=a.txt`) or several (`data.path=[a.txt,b.txt]`); a list after checks."""
    text_field: str = "text"
    """The JSONL field that holds a record's text (records with `token_ids` use those)."""

    def check(self, key: str) -> None:
        self.path = [self.path] if isinstance(self.path, str) else list(self.path or [])
        _require(len(self.path) > 0, f"{key}.path", self.path,
                 f"give at least one input file: {key}.path=corpus.txt")
        for p in self.path:
            _require(Path(p).is_file(), f"{key}.path", p, "file not found")
        super().check(key)


@dataclass
class TopkParams:
    """Teacher top-k at every position."""

    k: int = 128
    """Entries per position."""
    dtype: str = "int8"
    """Stored logprob format: int8 (per-position scale and offset), fp16 or bf16."""
    batch_size: int = 8
    """Sequences per /v1/topk request."""
    concurrency: int = 4
    """Requests in flight."""
    shard_size: int = 1024
    """Sequences per cache shard."""
    max_length: Optional[int] = None
    """Truncate sequences to this many tokens (None: the server's max-model-len)."""

    def check(self, key: str) -> None:
        _require(self.k >= 1, f"{key}.k", self.k, "must be >= 1")
        _require(self.dtype in TOPK_DTYPES, f"{key}.dtype", self.dtype, f"choose one of {TOPK_DTYPES}")
        _require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "must be >= 1")
        _require(self.concurrency >= 1, f"{key}.concurrency", self.concurrency, "must be >= 1")
        _require(self.shard_size >= 1, f"{key}.shard_size", self.shard_size, "must be >= 1")
        _require(self.max_length is None or self.max_length >= 2, f"{key}.max_length",
                 self.max_length, "must be >= 2")


@dataclass
class TopkRunConfig(RunConfig):
    """`mode=topk`: a teacher's top-k logprobs at every position, cached for distillation."""

    mode_name: str = "topk"
    teacher: ServerConfig = field(default_factory=ServerConfig)
    data: SequenceDataConfig = field(default_factory=SequenceDataConfig)
    topk: TopkParams = field(default_factory=TopkParams)


@dataclass
class PerplexityParams:
    """Sliding-window perplexity (the Hugging Face guide's method)."""

    context_length: int = 2048
    """Tokens per window."""
    stride: int = 512
    """How far each window advances; the overlap is context only."""
    concurrency: int = 8
    """Windows in flight."""
    add_bos: bool = True
    """Start the tokenised corpus with the model's BOS token."""

    def check(self, key: str) -> None:
        _require(self.context_length >= 2, f"{key}.context_length", self.context_length,
                 "must be >= 2")
        _require(1 <= self.stride <= self.context_length, f"{key}.stride", self.stride,
                 f"must be in [1, {key}.context_length={self.context_length}]")
        _require(self.concurrency >= 1, f"{key}.concurrency", self.concurrency, "must be >= 1")


@dataclass
class PerplexityRunConfig(RunConfig):
    """`mode=perplexity`: sliding-window perplexity of a served model on text corpora."""

    mode_name: str = "perplexity"
    model: ServerConfig = field(default_factory=ServerConfig)
    data: SequenceDataConfig = field(default_factory=SequenceDataConfig)
    ppl: PerplexityParams = field(default_factory=PerplexityParams)


@dataclass
class ScoreDataConfig(ShardedInputConfig):
    """(prompt, completion) records for score mode: one JSONL file."""

    path: str = "???"
    """JSONL: `prompt` (or chat `messages`, or `prompt_token_ids`) and `completion` (or a list
    `completions`, or `completion_token_ids`); samples.jsonl of sample mode works as it is."""
    prompt_field: str = "prompt"
    """The JSONL field that holds a prompt's text (records with `messages` use those)."""
    chat_template: bool = True
    """Render `messages` records with the model's chat template."""

    def check(self, key: str) -> None:
        _require(self.path not in ("", "???"), f"{key}.path", self.path,
                 f"give the records to score: {key}.path=pairs.jsonl")
        _require(Path(self.path).is_file(), f"{key}.path", self.path, "file not found")
        super().check(key)


@dataclass
class ScoreParams:
    """Logprobs of given completions."""

    per_token: bool = True
    """Write per-token `logp_*` lists and the token ids (false: sums and means only)."""
    batch_size: int = 32
    """(prompt, completion) sequences per request; a prompt's completions share a request."""
    concurrency: int = 4
    """Requests in flight per server."""
    route: str = "auto"
    """`topk`: the plugin's binary /v1/topk with k = 1; `stock`: /v1/completions with
    prompt_logprobs=0 (any vLLM server); `auto`: topk where the server has it."""

    def check(self, key: str) -> None:
        _require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "must be >= 1")
        _require(self.concurrency >= 1, f"{key}.concurrency", self.concurrency, "must be >= 1")
        _require(self.route in SCORE_ROUTES, f"{key}.route", self.route,
                 f"choose one of {SCORE_ROUTES}")


@dataclass
class ScoreRunConfig(RunConfig):
    """`mode=score`: logprobs of given completions under theta and, optionally, the target."""

    mode_name: str = "score"
    theta: ServerConfig = field(default_factory=ServerConfig)
    target: Optional[ServerConfig] = field(default_factory=lambda: ServerConfig(url=None))
    """No URL (the default) scores under theta only; `target.url=...` adds the target and
    `log_w`. None after the checks when there is no URL."""
    data: ScoreDataConfig = field(default_factory=ScoreDataConfig)
    score: ScoreParams = field(default_factory=ScoreParams)

    def __post_init__(self) -> None:
        if self.target is not None and self.target.url is None:
            self.target = None
        super().__post_init__()


SCHEMAS: dict[str, type[RunConfig]] = {
    "sample": SampleRunConfig, "topk": TopkRunConfig, "perplexity": PerplexityRunConfig,
    "score": ScoreRunConfig}


def register_schemas() -> None:
    """Store each mode's schema as `mode/<name>_schema` (package `_global_`)."""
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(group="mode", name=f"{name}_schema", node=schema, package="_global_")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Validate a composed config against its mode's schema and build the dataclasses.

    Raises ConfigError naming the key on unknown keys, wrong types or invalid values.
    """
    name = cfg.get("mode_name")
    if name not in SCHEMAS:
        raise ConfigError(f"config key `mode` = {name!r} is invalid: choose one of "
                          f"{sorted(SCHEMAS)} (e.g. `mode=sample`).")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), cfg)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key `{key}` is invalid: {exc.msg if hasattr(exc, 'msg') else exc}. "
                          f"Fix it on the command line or in conf/.") from exc
