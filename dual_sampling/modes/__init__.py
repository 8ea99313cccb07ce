"""What each Hydra mode runs; `run_mode` dispatches on the validated run config."""
from __future__ import annotations

import importlib

from dual_sampling.config import RunConfig


def run_mode(config: RunConfig) -> None:
    module = importlib.import_module(f"dual_sampling.modes.{config.mode_name}")
    module.run(config)
