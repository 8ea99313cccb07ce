"""Reference pages made from the code, so they cannot drift from it.

    python -m dual_sampling.docs_reference            # rewrite docs/reference/*.md
    python -m dual_sampling.docs_reference --check    # exit 1 naming each stale page

- `config.md`: every config key of every mode (dotted key, type, default, description). The
  keys, types and defaults come from the schemas in config.py and conf/mode/*.yaml (composed
  by Hydra); the descriptions are the attribute docstrings under each field of config.py,
  read with `ast`. A field without one reads "(no description)".
- `records.md`: every field of `samples.jsonl`, `groups.jsonl` and `summary.json`. The field
  names come from the code that builds them (`sampling.sequence_record` on a fake sequence,
  `groups.group_weights`, `sample_stats.summarize` and the dict modes/sample.py adds to it);
  their descriptions are `SAMPLES`, `GROUPS` and `SUMMARY` below, and tests/test_docs.py
  fails when a field has no description or a description no field.
- `start_vllm.md`: every flag of dual_sampling/start_vllm.sh, read from its `case` lines,
  with the default the script sets and a description from `FLAGS` below (same test).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
OUT_DIR = "docs/reference"
COMMAND = "python -m dual_sampling.docs_reference"
NO_DESCRIPTION = "(no description)"
HEADER = ("<!-- Made by `{command}` from {source}: edit those, then run it "
          "(tests/test_docs.py fails while this page differs). -->\n\n")

# -- config.md ---------------------------------------------------------------------------


def field_docstrings(source: Path = PACKAGE / "config.py") -> dict[tuple[str, str], str]:
    """(class name, field name) -> the string literal right under that field, one line."""
    docs: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[(node.name, stmt.target.id)] = " ".join(after.value.value.split())
    return docs


def _docstring(cls: type, name: str, docs: dict[tuple[str, str], str]) -> str | None:
    """A field's docstring, from the first class in the MRO that declares one."""
    for klass in cls.__mro__:
        if (klass.__name__, name) in docs:
            return docs[(klass.__name__, name)]
    return None


def composed_defaults(mode: str) -> dict[str, Any]:
    """The mode's config as a user gets it with no overrides (interpolations unresolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dual_sampling.config import register_schemas
    register_schemas()
    with initialize_config_dir(config_dir=str(PACKAGE / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"mode={mode}"])
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def config_rows(schema: type, defaults: dict[str, Any], docs: dict[tuple[str, str], str],
                prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every leaf field of `schema`, recursively."""
    hints = typing.get_type_hints(schema)
    rows = []
    for f in dataclasses.fields(schema):
        key, hint = prefix + f.name, hints[f.name]
        nested = [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
        if nested:
            rows += config_rows(nested[0], defaults.get(f.name) or {}, docs, key + ".")
            continue
        rows.append((key, _type_name(hint), _default(defaults.get(f.name, "???")),
                     _docstring(schema, f.name, docs) or NO_DESCRIPTION))
    return rows


def _type_name(hint: Any) -> str:
    return re.sub(r"\b(typing|builtins)\.", "", getattr(hint, "__name__", None)
                  if not typing.get_args(hint) else str(hint)).replace("NoneType", "None")


def _default(value: Any) -> str:
    if value == "???":
        return "required"
    if value is None:
        return "null"
    return str(value).replace("'", "") if isinstance(value, list) else str(value)


def missing_config_docstrings() -> list[str]:
    """Every config key, in any mode, whose field has no docstring."""
    from dual_sampling.config import SCHEMAS
    docs = field_docstrings()
    return sorted({row[0] for mode, schema in SCHEMAS.items()
                   for row in config_rows(schema, {}, docs) if row[3] == NO_DESCRIPTION})


def config_page() -> str:
    from dual_sampling.config import SCHEMAS
    docs = field_docstrings()
    out = [HEADER.format(command=COMMAND, source="dual_sampling/config.py and conf/mode/*.yaml"),
           "# Config keys, every mode\n\n",
           "Give a key on the command line (`python -m dual_sampling mode=sample key=value`) "
           "or sweep it (`-m key=a,b`). Defaults are what `conf/` composes to; `required` "
           "keys have none; `${...}` is an interpolation Hydra resolves at run time. "
           "What each mode does: [sample](../sample.md), [score](../score.md), "
           "[topk](../topk.md), [perplexity](../perplexity.md).\n"]
    for mode, schema in SCHEMAS.items():
        out.append(f"\n## `mode={mode}`\n\n| key | type | default | description |\n"
                   "| --- | --- | --- | --- |\n")
        for key, type_name, default, text in config_rows(schema, composed_defaults(mode), docs):
            out.append(f"| `{key}` | `{type_name}` | `{default}` | {_cell(text)} |\n")
    return "".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# -- records.md --------------------------------------------------------------------------
# field -> (meaning, unit, when it is null). Per-token fields are lists with one entry per
# completion token.
SAMPLES: dict[str, tuple[str, str, str]] = {
    "index": ("the prompt's line in the prompts file (0-based, before sharding)", "", "never"),
    "sample_index": ("which of the prompt's `sample.n` completions, in [0, n)", "", "never"),
    "prompt": ("the prompt as given: a string, or the chat `messages`", "", "never"),
    "completion": ("the completion, detokenised", "", "never"),
    "prompt_token_ids": ("the prompt's token ids as sampled from (chat template applied)",
                         "ids", "never"),
    "completion_token_ids": ("the sampled tokens", "ids", "never"),
    "finish_reason": ("`stop` (EOS or a stop string) or `length` (`sample.max_tokens` or "
                      "the context length)", "", "never"),
    "num_tokens": ("completion length", "tokens", "never"),
    "alpha": ("per token: the mixture weight used, alpha\\* or the fixed `sample.alpha`",
              "[0, 1]", "never"),
    "logp_theta": ("per token: log pi_theta of the sampled token over the full vocabulary "
                   "(request/session: the `sample.missing` value when it was outside theta's "
                   "top-k)", "nats", "an entry is null where the value is -inf "
                   "(`missing=floor`)"),
    "logp_target": ("per token: log pi_t of the sampled token, as `logp_theta`", "nats",
                    "as `logp_theta`"),
    "logp_q": ("per token: log-probability of the token under the distribution it was drawn "
               "from, q_T = q\\*^(1/T) normalised", "nats", "never"),
    "kl_q_theta": ("per token: KL(q_T || pi_theta) at that position (request/session: over "
                   "the merged candidates)", "nats", "an entry is null where it is infinite"),
    "kl_q_target": ("per token: KL(q_T || pi_t) at that position", "nats",
                    "an entry is null where it is infinite"),
    "entropy_q": ("per token: entropy of q_T at that position", "nats", "never"),
    "coverage_theta": ("per token: probability mass of theta's top-k (exact paths: 1)", "[0, 1]",
                       "never"),
    "coverage_target": ("per token: probability mass of the target's top-k (exact paths: 1)",
                        "[0, 1]", "never"),
    "in_topk_theta": ("per token: whether the token was in theta's top-k (exact paths: true)", "bool",
                      "never"),
    "in_topk_target": ("per token: whether the token was in the target's top-k (exact paths: true)",
                       "bool", "never"),
    "sum_logp_theta": ("sum of `logp_theta`: the completion's log pi_theta given the prompt",
                       "nats", "when any `logp_theta` entry is null"),
    "sum_logp_target": ("sum of `logp_target`", "nats", "when any `logp_target` entry is null"),
    "sum_logp_q": ("sum of `logp_q`", "nats", "when any `logp_q` entry is null"),
    "log_w_theta": ("sequence log importance weight towards theta: sum_logp_theta - sum_logp_q",
                    "nats", "when either sum is null"),
    "log_w_target": ("sequence log importance weight towards the target: sum_logp_target - "
                     "sum_logp_q", "nats", "when either sum is null"),
    "mean_alpha": ("mean of `alpha` over the completion", "[0, 1]", "never"),
    "temperature": ("`sample.temperature` T the tokens were drawn at", "", "never"),
    "theta_model": ("theta's served model name (fused: `<name>[theta]`)", "", "never"),
    "target_model": ("the target's served model name (fused: `<name>[target]`)", "", "never"),
    "theta_version": ("load_theta's count on the theta server (0: the weights it started with)",
                      "", "when the server does not report it (no plugin)"),
    "theta_path": ("the theta checkpoint the server served", "",
                   "when the server does not report it (no plugin)"),
    "candidates": ("only with `sample.record_candidates=true` (request/session): per token, "
                   "`ids_theta`, `logp_theta`, `ids_target`, `logp_target`, both servers' "
                   "top-k lists", "nats", "absent otherwise; a logprob entry is null where "
                   "-inf"),
}
GROUPS: dict[str, tuple[str, str, str]] = {
    "index": ("the prompt's index (one row per prompt whose n samples are all written)", "",
              "never"),
    "n": ("samples in the group (`sample.n`)", "", "never"),
    "log_w_theta": ("the samples' `log_w_theta`, in sample_index order", "nats",
                    "an entry is null where the sample's is"),
    "log_w_target": ("the samples' `log_w_target`, in sample_index order", "nats",
                     "an entry is null where the sample's is"),
    "weight_theta": ("self-normalised weights towards theta: softmax of `log_w_theta` (sum 1)",
                     "", "never"),
    "weight_target": ("self-normalised weights towards the target (sum 1)", "", "never"),
    "ess_theta": ("Kish effective sample size of `weight_theta`", "[1, n]", "never"),
    "ess_target": ("Kish effective sample size of `weight_target`", "[1, n]", "never"),
    "ess_theta_fraction": ("`ess_theta` / n", "[1/n, 1]", "never"),
    "ess_target_fraction": ("`ess_target` / n", "[1/n, 1]", "never"),
}
SUMMARY: dict[str, tuple[str, str, str]] = {
    "num_sequences": ("records in samples.jsonl (all runs on this output_dir)", "", "never"),
    "num_prompts": ("distinct prompts among them", "", "never"),
    "num_tokens": ("completion tokens among them", "tokens", "never"),
    "mean_alpha": ("mean alpha per token", "[0, 1]", "never"),
    "mean_kl_q_theta": ("mean KL(q_T || pi_theta) per token", "nats", "never"),
    "mean_kl_q_target": ("mean KL(q_T || pi_t) per token", "nats", "never"),
    "mean_coverage_theta": ("mean top-k mass of theta per token (exact paths: 1)", "[0, 1]", "never"),
    "mean_coverage_target": ("mean top-k mass of the target per token (exact paths: 1)", "[0, 1]",
                             "never"),
    "ess_theta": ("Kish ESS of all sequences' weights towards theta", "sequences", "never"),
    "ess_theta_fraction": ("`ess_theta` / num_sequences", "", "never"),
    "ess_target": ("Kish ESS of all sequences' weights towards the target", "sequences",
                   "never"),
    "ess_target_fraction": ("`ess_target` / num_sequences", "", "never"),
    "finish_reasons": ("records per finish_reason", "", "never"),
    "groups_complete": ("groups with all n samples (only with n > 1)", "", "absent with n = 1"),
    "mean_group_ess_theta_fraction": ("mean of the groups' `ess_theta_fraction` (n > 1)", "",
                                      "without a complete group; absent with n = 1"),
    "mean_group_ess_target_fraction": ("mean of the groups' `ess_target_fraction` (n > 1)", "",
                                       "without a complete group; absent with n = 1"),
    "top_k": ("candidates per server and step (request, session over the merged top-k)", "",
              "on an exact path (fused, or session with sample.top_k unset)"),
    "alpha_method": ("the alpha rule that ran (`sample.alpha_method`; fixed when "
                     "`sample.alpha` is set)", "", "never"),
    "alpha_min": ("`sample.alpha_min`: the lower clamp of alpha", "", "never"),
    "alpha_max": ("`sample.alpha_max`: the upper clamp of alpha", "", "never"),
    "exact": ("whether q* covered the whole vocabulary (fused; session with sample.top_k "
              "unset) or the two servers' merged top-k", "", "never"),
    "n": ("`sample.n`", "", "never"),
    "temperature": ("`sample.temperature`", "", "never"),
    "tokens_this_run": ("tokens sampled by this run (not the ones resumed from)", "tokens",
                        "never"),
    "tokens_per_s": ("`tokens_this_run` / this run's sampling time", "tokens/s", "never"),
    "server_wait_fraction": ("share of the coordinators' time spent awaiting the servers", "",
                             "never"),
    "replica_pairs": ("replica pairs (fused: replicas) that sampled", "", "never"),
    "transport": ("`fused`, `session` or `request`", "", "never"),
    "theta_version": ("the records' `theta_version`; a sorted list when a resumed run spans "
                      "several", "", "when the records' are"),
    "theta_path": ("the records' `theta_path`; a list when several", "", "when the records' are"),
    "dataset": ("path of samples.jsonl", "", "never"),
}
RECORD_DESCRIPTIONS = {"samples.jsonl": SAMPLES, "groups.jsonl": GROUPS, "summary.json": SUMMARY}


def record_fields() -> dict[str, list[str]]:
    """The fields each file gets, in the order the code writes them, from the code that
    builds them: a fake two-sample group through `sequence_record`, `group_weights`,
    `summarize` and the keys modes/sample.py adds to the summary."""
    from dual_sampling.maths import sample_stats
    from dual_sampling.maths import groups
    from dual_sampling.clients.client import ServerInfo
    from dual_sampling.config import SampleParams
    from dual_sampling.core.coordinator import TOKEN_FIELDS, PromptItem, Sequence
    from dual_sampling.files import run_files
    from dual_sampling.modes import sample
    from dual_sampling.core.sampling import Sampling, sequence_record

    info = ServerInfo(url="http://x", model="m", max_model_len=64, bos_token_id=None,
                      eos_token_ids=(0,), vocab_size=8, has_plugin=True, theta_version=0,
                      theta_path="/ckpt")
    sampling = Sampling([object()], [object()], SampleParams(n=2), 0, [info, info], "session",
                        1.0, 0)
    records = []
    for sample_index in range(2):
        seq = Sequence(item=_prompt_item(PromptItem), sample_index=sample_index, key=0,
                       completion_ids=[3], finish_reason="stop",
                       tokens={name: [0.5] for name in TOKEN_FIELDS},
                       candidates=[{"ids_theta": [3], "logp_theta": [-0.1]}])
        records.append(sequence_record(seq, "x", {**sampling.run_fields, **info.theta_fields}))
    summary = {**sample_stats.summarize(records, n=2),
               **dict.fromkeys(_summary_update_keys(Path(sample.__file__))),
               **run_files.theta_summary(records)}
    return {"samples.jsonl": list(records[0]), "groups.jsonl": list(groups.group_weights(records, 2)[0]),
            "summary.json": list(summary)}


def _prompt_item(cls: type) -> Any:
    """A PromptItem of one token, whatever fields it has beyond index, prompt, prompt_ids."""
    values = {"index": 0, "prompt": "p", "prompt_ids": [1]}
    return cls(**{f.name: values.get(f.name) for f in dataclasses.fields(cls)
                  if f.name in values or f.default is dataclasses.MISSING})


def _summary_update_keys(source: Path) -> list[str]:
    """Literal keys of every `summary.update({...})` in modes/sample.py."""
    keys = []
    for node in ast.walk(ast.parse(source.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "summary" and node.args
                and isinstance(node.args[0], ast.Dict)):
            keys += [k.value for k in node.args[0].keys if isinstance(k, ast.Constant)]
    return keys


def records_page() -> str:
    fields = record_fields()
    out = [HEADER.format(command=COMMAND, source="the code that builds each record "
                         "(sampling.py, groups.py, sample_stats.py, modes/sample.py) and the "
                         "descriptions in dual_sampling/docs_reference.py"),
           "# What sample mode writes\n\n",
           "Every field of the files in a sample run's `output_dir` ([sample.md](../sample.md)"
           " says how they are made). Logprobs are natural logs (nats). Per-token fields are "
           "lists with one entry per completion token.\n"]
    for name, descriptions in RECORD_DESCRIPTIONS.items():
        out.append(f"\n## `{name}`\n\n| field | meaning | unit | null when |\n"
                   "| --- | --- | --- | --- |\n")
        for field in fields[name]:
            meaning, unit, null = descriptions.get(field, (NO_DESCRIPTION, "", ""))
            out.append(f"| `{field}` | {_cell(meaning)} | {unit} | {_cell(null)} |\n")
    return "".join(out)


# -- start_vllm.md -----------------------------------------------------------------------
START_VLLM = PACKAGE / "start_vllm.sh"
FLAGS: dict[str, str] = {
    "--theta": "theta's checkpoint (a local directory; a hub id works without --fused): "
               "starts the theta server, or with --fused the engine's theta",
    "--target": "the target's checkpoint: starts the target server, or with "
                "--fused the engine's target",
    "--model": "one more server of one model, role `model` (topk teacher, perplexity)",
    "--theta-port": "the theta server's port",
    "--target-port": "the target server's port",
    "--port|--model-port": "the `--model` server's port, or the --fused engine's (default 8000 "
                           "with --fused)",
    "--theta-gpus": "CUDA_VISIBLE_DEVICES of the theta server, e.g. `0` or `0,1`",
    "--target-gpus": "CUDA_VISIBLE_DEVICES of the target server",
    "--gpus": "CUDA_VISIBLE_DEVICES of the `--model` server or of the --fused engine",
    "--tp": "tensor-parallel size of every server (vLLM's --tensor-parallel-size)",
    "--dp": "data-parallel size of every server (vLLM's --data-parallel-size)",
    "--cpu": "serve on CPU: float32, VLLM_CPU_KVCACHE_SPACE (default 1 GiB), HF_HUB_OFFLINE=1 "
             "unless set, and the 1 ms shm spin for a theta/target pair",
    "--fused": "serve theta and target in ONE engine (role `fused`) after checking the pair "
               "(fused/setup.py); needs --theta and --target as local directories",
    "--speculate": "with --fused: theta drafts K tokens a step (`K`, or `K:B`: only while at "
                   "most B requests run); 0 = off",
    "--max-logprobs": "vLLM's --max-logprobs: the largest top-k a request may ask",
    "--run-dir": "where logs and pid files go (default: DUAL_SAMPLING_RUN_DIR, else "
                 ".cache/vllm); `stop` needs the same",
    "--timeout": "seconds to wait for each server's /health and /v1/models before giving up",
    "--watch-pid": "stop the servers once process PID exits (self-serving jobs' watchdog)",
    "--api-key": "the key every server requires on /v1/... (default: VLLM_API_KEY; prefer the "
                 "variable, a command line shows in `ps`)",
    "-h|--help": "print the usage (the script's header) and exit",
    "--": "everything after it goes to every vLLM server as it is",
}


def script_flags(script: Path = START_VLLM) -> list[tuple[str, bool, str]]:
    """(flag pattern, takes a value, default) for each `case` label of the argument loop;
    the default is the script's top-level assignment of the variable the flag sets."""
    text = script.read_text()
    top = dict(re.findall(r'^([A-Z_]+)=(.*)$', text, flags=re.M))
    top.update(("PORT[%s]" % role, port)
               for role, port in re.findall(r'add_role (\w+) "\$2" (\d+)', text))
    flags = []
    for label, body in re.findall(r'^\s+(-[-\w|]*)\)\s*(.*?);;', text, flags=re.M):
        var = re.match(r'([\w\[\]]+)="\$2"', body)
        flags.append((label, "shift 2" in body, top.get(var.group(1), "").strip('"') if var else ""))
    return flags


def flag_names(script: Path = START_VLLM) -> set[str]:
    """Every flag the script takes (`--port|--model-port` gives two)."""
    return {name for label, _, _ in script_flags(script) for name in label.split("|")}


def start_vllm_page() -> str:
    out = [HEADER.format(command=COMMAND, source="the argument loop of "
                         "dual_sampling/start_vllm.sh and the descriptions in "
                         "dual_sampling/docs_reference.py"),
           "# `start_vllm.sh` flags\n\n",
           "`./start_vllm.sh` at the root (or `dual-sampling-serve` when installed) runs "
           "`dual_sampling/start_vllm.sh`. How to use it: [serving.md](../serving.md), "
           "[gpu.md](../gpu.md). `./start_vllm.sh stop [--run-dir DIR]` stops exactly the "
           "servers that run dir records.\n\n"
           "| flag | value | default | what it does |\n| --- | --- | --- | --- |\n"]
    for label, takes_value, default in script_flags():
        names = ", ".join(f"`{n}`" for n in label.split("|"))
        out.append(f"| {names} | {'yes' if takes_value else 'no'} | "
                   f"{f'`{default}`' if default else '-'} | "
                   f"{_cell(FLAGS.get(label, NO_DESCRIPTION))} |\n")
    return "".join(out)


# -- the pages ---------------------------------------------------------------------------
PAGES = {"config.md": config_page, "records.md": records_page, "start_vllm.md": start_vllm_page}


def render() -> dict[str, str]:
    """Page path (relative to the repository) -> its text."""
    return {f"{OUT_DIR}/{name}": make() for name, make in PAGES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each page that differs")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to write into")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = args.repo / rel
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for rel in stale:
        print(f"{'stale' if args.check else 'wrote'}: {rel}")
    missing = missing_config_docstrings()
    if missing:
        print(f"config keys without a docstring in config.py: {', '.join(missing)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
