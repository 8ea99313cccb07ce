"""Config validation: every bad value fails before any request, naming its key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from dual_sampling.config import register_schemas, to_run_config
from dual_sampling.errors import ConfigError

CONF = str(Path(__file__).resolve().parent.parent / "conf")
register_schemas()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_run_config(compose("config", overrides=["output_dir=/tmp/unused", *overrides]))


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    return path


@pytest.mark.parametrize("override, key", [
    ("sample.top_k=0", "sample.top_k"),
    ("sample.max_tokens=0", "sample.max_tokens"),
    ("sample.alpha=1.5", "sample.alpha"),
    ("sample.alpha=-0.1", "sample.alpha"),
    ("sample.missing=guess", "sample.missing"),
    ("sample.concurrency=0", "sample.concurrency"),
    ("sample.n=0", "sample.n"),
    ("sample.temperature=0", "sample.temperature"),
    ("sample.temperature=-1", "sample.temperature"),
    ("sample.temperature=inf", "sample.temperature"),
    ("theta.url=localhost:8000", "theta.url"),
    ("target.timeout_s=0", "target.timeout_s"),
    ("wandb.mode=sometimes", "wandb.mode"),
    ("data.shard_index=2", "data.shard_index"),
])
def test_sample_bad_values_name_their_key(prompts, override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load(f"data.prompts={prompts}", override)


def test_missing_prompt_file_names_the_key():
    with pytest.raises(ConfigError, match="`data.prompts`.*file not found"):
        load("data.prompts=/nonexistent/prompts.jsonl")


@pytest.mark.parametrize("mode, override, key", [
    ("perplexity", "ppl.stride=0", "ppl.stride"),
    ("perplexity", "ppl.stride=4096", "ppl.stride"),
    ("perplexity", "ppl.context_length=1", "ppl.context_length"),
    ("topk", "topk.k=0", "topk.k"),
    ("topk", "topk.dtype=int4", "topk.dtype"),
    ("topk", "teacher.url=[http://a:1,http://b:2]", "teacher.url"),
])
def test_other_modes_bad_values(prompts, mode, override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load(f"mode={mode}", f"data.path={prompts}", override)


def test_wrong_type_fails_at_composition(prompts):
    with pytest.raises(ConfigCompositionException, match="sample.top_k"):
        load(f"data.prompts={prompts}", "sample.top_k=many")


def test_replica_lists_and_defaults(prompts):
    config = load(f"data.prompts={prompts}", "theta.url=[http://a:1,http://b:2]")
    assert config.theta.urls == ["http://a:1", "http://b:2"]
    assert config.sample.alpha is None and config.sample.missing == "kth"


def test_entry_point_exits_2_with_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dual_sampling", "mode=sample",
                           "data.prompts=/nonexistent.jsonl", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "ConfigError: config key `data.prompts`" in done.stderr


def test_data_fields_compose_without_plus_and_the_prompt_column_is_given_once(tmp_path):
    """data.fields.solution=answer composes as typed (no `+`: the names are schema keys);
    giving the prompt's column twice is a ConfigError naming the key."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "2+3?", "answer": "5"}\n')
    base = ["mode=sample", f"data.prompts={path}"]
    config = load(*base, "data.fields.solution=answer")
    assert config.data.fields.as_dict() == {"messages": "messages", "problem": "problem",
                                            "solution": "answer"}
    with pytest.raises(ConfigError, match="data.fields.prompt"):
        load(*base, "data.fields.prompt=question", "data.prompt_field=text")
