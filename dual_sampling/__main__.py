"""Hydra entry point: `python -m dual_sampling mode=sample|topk|perplexity|score key=value ...`.

Config errors (ConfigError) and every other DualSamplingError are printed as one clear
line and exit with status 2, before any request when the config is at fault. A run holds
its output_dir's lock (dual_sampling/files/run_lock.py) and, with `server.launch=fused|pair`, its
own engine (dual_sampling/serving/self_serve.py) while it runs.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dual_sampling.config import register_schemas, to_run_config
from dual_sampling.errors import DualSamplingError
from dual_sampling.files.run_lock import run_lock
from dual_sampling.serving.self_serve import serving

log = logging.getLogger("dual_sampling")
OVERRIDES_FILE = "overrides.yaml"
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # root conf/ links here

register_schemas()


def _sweep_output_dir(output_dir: str) -> str:
    """In a sweep with one explicit output_dir, give each job its own subfolder."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and Path(output_dir).resolve() != Path(hc.runtime.output_dir).resolve():
        return str(Path(output_dir) / f"job{hc.job.num}")
    return output_dir


def _sweep_group(output_dir: str) -> str | None:
    """The W&B group of a sweep's jobs: the name of the run dir that holds them."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(output_dir).resolve().parent.name


def _keep_overrides(output_dir: str) -> None:
    """Save the command-line overrides in output_dir where Hydra's `.hydra/overrides.yaml`
    is elsewhere (an explicit output_dir): the report reads a sweep's values from them."""
    hc = HydraConfig.get()
    if Path(output_dir).resolve() != Path(hc.runtime.output_dir).resolve():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(list(hc.overrides.task)),
                       Path(output_dir) / OVERRIDES_FILE)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_config = to_run_config(cfg)
        run_config.output_dir = _sweep_output_dir(run_config.output_dir)
        run_config.wandb.group = run_config.wandb.group or _sweep_group(run_config.output_dir)
        with run_lock(run_config.output_dir):
            _keep_overrides(run_config.output_dir)
            from dual_sampling.modes import run_mode
            with serving(run_config):
                run_mode(run_config)
    except DualSamplingError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
