"""Shared fixtures: the tiny model pair, and real vLLM CPU servers started once per session.

Servers are started with the project's own `start_vllm.sh` (so the script is under test
too), on free loopback ports, and stopped at the end of the session.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """`{"theta": dir, "target": dir}`, built once (cached across sessions)."""
    from dual_sampling.tiny_models import ensure_tiny_models
    return ensure_tiny_models()


@dataclass
class Servers:
    """vLLM servers started by start_vllm.sh in one run dir; roles map to ports."""

    run_dir: Path
    models: dict[str, Path]
    ports: dict[str, int] = field(default_factory=dict)
    extra: tuple[str, ...] = ("--max-model-len", "2048")

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    def start(self, *roles: str) -> None:
        args = ["bash", str(REPO / "start_vllm.sh"), "--cpu", "--run-dir", str(self.run_dir),
                "--max-logprobs", "256", "--timeout", "600"]
        for role in roles:
            self.ports.setdefault(role, free_port())
            args += [f"--{role}", str(self.models[role]), f"--{role}-port", str(self.ports[role])]
        env = {**os.environ, "PYTHON": sys.executable}
        done = subprocess.run(args + ["--", *self.extra], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"start_vllm.sh failed:\n{done.stdout}\n{done.stderr}")

    def kill(self, role: str) -> None:
        """SIGKILL one server's process group (a crash, not a clean stop)."""
        pid = int((self.run_dir / f"{role}.pid").read_text())
        subprocess.run(["kill", "-KILL", "--", f"-{pid}"], check=False)
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url(role) + "/health", timeout=1)
            except OSError:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(["bash", str(REPO / "start_vllm.sh"), "stop", "--run-dir", str(self.run_dir)],
                       capture_output=True)


@pytest.fixture(scope="session")
def servers(tiny_models, tmp_path_factory) -> Servers:
    """theta and target servers (with this package's plugin), up for the whole session."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    pair = Servers(run_dir=tmp_path_factory.mktemp("vllm"), models=dict(tiny_models))
    pair.start("theta", "target")
    yield pair
    pair.stop()
