"""Start and stop vLLM servers through `start_vllm.sh`, read their metrics (tests, benchmarks,
and the engine of a self-serving job: dual_sampling/serving/self_serve.py).

    servers = Servers(run_dir=Path("/tmp/vllm"), models={"theta": a, "target": b})
    servers.start("theta", "target")   # free loopback ports, waits for /health
    servers.start_fused()              # role "fused": both models in one engine
    servers.url("theta"); servers.kill("target"); servers.stop()
    running, waiting = server_metrics(url, "vllm:num_requests_running", "vllm:num_requests_waiting")
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ENGINE_STEPS = "vllm:iteration_tokens_total_count"  # a vLLM counter: +1 per engine step
START_SCRIPT = Path(__file__).resolve().parents[1] / "start_vllm.sh"  # root start_vllm.sh links here


def server_metrics(url: str, *names: str) -> tuple[float, ...]:
    """Each named series of a vLLM server's Prometheus `/metrics`, summed over its labels."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return tuple(sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$",
                                                  text, re.M))
                 for name in names)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Servers:
    """vLLM servers (CPU unless `cpu=False`) started by start_vllm.sh in one run dir; roles
    map to ports.

    Roles are start_vllm.sh's: `theta`, `target`, `model` and `fused` (start_fused).
    """

    run_dir: Path
    models: dict[str, Path]
    ports: dict[str, int] = field(default_factory=dict)
    extra: tuple[str, ...] = ("--max-model-len", "2048")
    max_logprobs: int = 256
    env: dict[str, str] = field(default_factory=dict)  # over os.environ, for start_vllm.sh
    cpu: bool = True  # start_vllm.sh --cpu; False: vLLM's defaults for the device it finds
    timeout_s: int = 900  # start_vllm.sh --timeout: how long to wait for each server
    script_args: tuple[str, ...] = ()  # more start_vllm.sh options (--tp, --watch-pid, ...)
    # the servers' API key, handed to start_vllm.sh as VLLM_API_KEY (never argv, never shown)
    api_key: str | None = field(default=None, repr=False)

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    def start(self, *roles: str) -> None:
        """Start the roles (together) and wait until each answers; RuntimeError if not."""
        args = []
        for role in roles:
            self.ports.setdefault(role, free_port())
            args += [f"--{role}", str(self.models[role]), f"--{role}-port", str(self.ports[role])]
        self._script(args)

    def start_fused(self, speculate: int | str = 0) -> None:
        """Start the `fused` role: theta and target in one engine (start_vllm.sh --fused),
        speculative with theta drafting `speculate` tokens a step (`K` or `K:B`) when not 0."""
        self.ports.setdefault("fused", free_port())
        self._script(["--fused", "--theta", str(self.models["theta"]), "--target",
                      str(self.models["target"]), "--port", str(self.ports["fused"]),
                      *(["--speculate", str(speculate)] if str(speculate) != "0" else [])])

    def _script(self, role_args: list[str]) -> None:
        args = ["bash", str(START_SCRIPT), *(["--cpu"] if self.cpu else []),
                "--run-dir", str(self.run_dir),
                "--max-logprobs", str(self.max_logprobs), "--timeout", str(self.timeout_s),
                *self.script_args, *role_args]
        env = {**os.environ, "PYTHON": sys.executable, **self.env,
               **({"VLLM_API_KEY": self.api_key} if self.api_key else {})}
        done = subprocess.run(args + ["--", *self.extra], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"start_vllm.sh failed:\n{done.stdout}\n{done.stderr}")

    def kill(self, role: str) -> None:
        """SIGKILL one server's process group (a crash, not a clean stop); wait until down."""
        pid = int((self.run_dir / f"{role}.pid").read_text())
        subprocess.run(["kill", "-KILL", "--", f"-{pid}"], check=False)
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url(role) + "/health", timeout=1)
            except OSError:
                return
            time.sleep(0.2)

    def alive(self, role: str) -> bool:
        """Whether the role's server process (as started here) is still running."""
        pid_file = self.run_dir / f"{role}.pid"
        if not pid_file.is_file():
            return False
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        # a killed server whose parent (start_vllm.sh) is gone can stay a zombie where the
        # container's init does not reap: signal 0 still reaches it
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")

    def log_tail(self, role: str, lines: int) -> list[str]:
        """The last non-empty lines of the role's server log."""
        log_file = self.run_dir / f"{role}.log"
        text = log_file.read_text(errors="replace") if log_file.is_file() else ""
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def stop(self) -> None:
        subprocess.run(["bash", str(START_SCRIPT), "stop", "--run-dir", str(self.run_dir)],
                       capture_output=True)


def serve_main() -> None:
    """`dual-sampling-serve ARGS`: the console script for start_vllm.sh, shipped in the package."""
    os.environ.setdefault("PYTHON", sys.executable)
    os.execvp("bash", ["bash", str(START_SCRIPT), *sys.argv[1:]])
