"""The Python API takes its defaults from the command line's config (no server).

On the code before, `DualSampler(chat_template=False)` while `data.chat_template` is true: the
same `{"messages": ...}` prompts were templated on one path and newline-joined on the other.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from dual_sampling import DualSampler
from dual_sampling.config import (PromptDataConfig, RunConfig, SampleParams, ScoreParams,
                                  ServerConfig)

# API parameter -> the config default it stands for (section, field)
SHARED = {
    DualSampler.__init__: {
        "transport": (SampleParams, "transport"), "top_k": (SampleParams, "top_k"),
        "missing": (SampleParams, "missing"), "concurrency": (SampleParams, "concurrency"),
        "seed": (RunConfig, "seed"), "chat_template": (PromptDataConfig, "chat_template"),
        "timeout_s": (ServerConfig, "timeout_s"), "max_retries": (ServerConfig, "max_retries")},
    DualSampler.sample: {
        "n": (SampleParams, "n"), "max_tokens": (SampleParams, "max_tokens"),
        "temperature": (SampleParams, "temperature"), "alpha": (SampleParams, "alpha"),
        "stop": (SampleParams, "stop")},
    DualSampler.score: {
        "per_token": (ScoreParams, "per_token"), "batch_size": (ScoreParams, "batch_size"),
        "concurrency": (ScoreParams, "concurrency")},
}


@pytest.mark.parametrize("method", list(SHARED), ids=lambda m: m.__qualname__)
def test_api_defaults_are_the_command_lines(method):
    signature = inspect.signature(method)
    for name, (schema, key) in SHARED[method].items():
        api_default = signature.parameters[name].default
        spec = {f.name: f for f in dataclasses.fields(schema)}[key]
        config_default = (spec.default if spec.default is not dataclasses.MISSING
                          else spec.default_factory())
        if isinstance(config_default, list):  # a mutable config default is an immutable API one
            api_default = list(api_default)
        assert api_default == config_default, (
            f"{method.__qualname__}({name}={api_default!r}) but the command line's "
            f"{schema.__name__}.{key} defaults to {config_default!r}")
