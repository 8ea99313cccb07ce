"""A job that serves itself: `server.launch=fused|pair` starts the job's own vLLM engine.

    python -m dual_sampling mode=sample server.launch=fused server.theta=A server.target=B \
        data.prompts=p.jsonl output_dir=runs/x

`serving(config)` starts the engine with start_vllm.sh on the devices the scheduler gave
this process (CUDA_VISIBLE_DEVICES, set by SLURM or Ray), on free loopback ports, points
theta.url/target.url at it, and stops it on every way out: the run's end, an exception,
Ctrl-C, SIGTERM or SIGHUP (handled here: stop, then exit 128 + signal), and the SIGUSR2 of a
SLURM preemption (submitit's handler requeues the job, then exits through the `finally`
here). Should the job die without running any of that (SIGKILL, a Ray worker killed), the
engine's watchdog (start_vllm.sh --watch-pid) stops it within seconds. Logs and pid files are
in `output_dir/engine/`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from dual_sampling.config import RunConfig, ServerLaunchConfig
from dual_sampling.errors import ServerError
from dual_sampling.serving.launch import Servers

log = logging.getLogger(__name__)
ENGINE_DIR = "engine"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES (set by SLURM and Ray), else
    every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def engine_servers(launch: ServerLaunchConfig, run_dir: Path, api_key: str | None = None) -> Servers:
    """The start_vllm.sh call for this launch config (started by `serving`).

    A pair gets disjoint GPUs when there are enough (theta the first tp, the target the next
    tp), else both engines share them at 0.45 of the GPU memory each. `api_key` guards the
    engine (None: none, unless VLLM_API_KEY is set, which start_vllm.sh honours)."""
    gpus = visible_gpus() if launch.device != "cpu" else []
    cpu = launch.device == "cpu" or (launch.device == "auto" and not gpus)
    extra = ["--tp", str(launch.tp)]
    vllm_args = list(launch.extra_args)
    if launch.max_model_len is not None:
        vllm_args += ["--max-model-len", str(launch.max_model_len)]
    if launch.launch == "pair" and not cpu:
        if len(gpus) >= 2 * launch.tp:
            extra += ["--theta-gpus", ",".join(gpus[:launch.tp]),
                      "--target-gpus", ",".join(gpus[launch.tp:2 * launch.tp])]
        elif "--gpu-memory-utilization" not in vllm_args:
            vllm_args += ["--gpu-memory-utilization", "0.45"]
    return Servers(run_dir=run_dir, models={"theta": Path(launch.theta), "target": Path(launch.target)},
                   extra=tuple(vllm_args), cpu=cpu, timeout_s=launch.timeout_s,
                   script_args=tuple(extra + ["--watch-pid", str(os.getpid())]),
                   api_key=api_key)


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside: SIGTERM/SIGHUP run `stop`, then exit with 128 + the signal's number.
    Only the main thread can set handlers; elsewhere the watchdog is the safety net."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        log.warning("caught %s: stopping the engine", signal.Signals(signum).name)
        stop()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def serving(config: RunConfig) -> Iterator[RunConfig]:
    """Start the engine `config.server` asks for (if any), point the config's server URLs
    at it, yield the config, and stop the engine however the block ends."""
    launch: ServerLaunchConfig | None = getattr(config, "server", None)
    if launch is None or launch.launch == "none":
        yield config
        return
    # the engine takes the key theta's clients send (theta.api_key_env), so the two agree
    servers = engine_servers(launch, Path(config.output_dir) / ENGINE_DIR,
                             config.theta.api_key)
    with ExitStack() as stack:
        stack.callback(servers.stop)
        stack.enter_context(stop_on_signals(servers.stop))
        log.info("starting this job's %s engine (theta %s, target %s; logs in %s)",
                 launch.launch, launch.theta, launch.target, servers.run_dir)
        try:
            if launch.launch == "fused":
                servers.start_fused(speculate=launch.speculate)
            else:
                servers.start("theta", "target")
        except RuntimeError as exc:
            raise ServerError(f"this job's {launch.launch} engine did not start (server.theta="
                              f"{launch.theta}, server.target={launch.target}; logs in "
                              f"{servers.run_dir}): {exc}") from exc
        roles = ("fused", "fused") if launch.launch == "fused" else ("theta", "target")
        for server, role in zip((config.theta, config.target), roles):
            server.url, server.model = servers.url(role), None
        try:
            yield config
        except ServerError as exc:
            raise _with_engine_log(exc, servers, sorted(set(roles))) from exc


def _with_engine_log(exc: ServerError, servers: Servers, roles: list[str]) -> ServerError:
    """The error, plus the log tail of each of this job's engines that is no longer running."""
    dead = [role for role in roles if not servers.alive(role)]
    if not dead:
        return exc
    tails = "; ".join(f"{role} engine exited, last lines of {servers.run_dir / (role + '.log')}: "
                      + " | ".join(servers.log_tail(role, 5)) for role in dead)
    return type(exc)(f"{exc} [{tails}] Run the same command again: it resumes the samples "
                     f"not yet written.")
