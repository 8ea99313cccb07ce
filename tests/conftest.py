"""Shared fixtures: the tiny model pair, and real vLLM CPU servers started once per session.

Servers are started with the project's own `start_vllm.sh` (so the script is under test
too), on free loopback ports, and stopped at the end of the session.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dual_sampling.launch import Servers, free_port  # noqa: F401  (tests import them here)

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """`{"theta": dir, "target": dir}`, built once (cached across sessions)."""
    from dual_sampling.tiny_models import ensure_tiny_models
    return ensure_tiny_models()


@pytest.fixture(scope="session")
def servers(tiny_models, tmp_path_factory) -> Servers:
    """theta and target servers (with this package's plugin), up for the whole session."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    pair = Servers(run_dir=tmp_path_factory.mktemp("vllm"), models=dict(tiny_models))
    pair.start("theta", "target")
    yield pair
    pair.stop()
