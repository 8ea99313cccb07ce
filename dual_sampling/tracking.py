"""Weights & Biases logging for every mode: resolved config, step metrics, tables, summary.

A run started again in the same output_dir continues the same W&B run (its id is kept in
`output_dir/wandb_run_id`). `wandb.mode=disabled` makes every call a no-op.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dual_sampling.config import RunConfig


class Tracker:
    """Thin wrapper over one wandb run."""

    def __init__(self, config: RunConfig) -> None:
        import wandb

        self._wandb = wandb
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(
            project=config.wandb.project, entity=config.wandb.entity, name=config.wandb.name,
            tags=list(config.wandb.tags), group=config.wandb.group, mode=config.wandb.mode, id=run_id, resume="allow",
            dir=config.wandb.dir or str(out), config=dataclasses.asdict(config),
            job_type=config.mode_name, settings=settings)
        self.enabled = config.wandb.mode != "disabled"

    def log(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self.enabled:
            self.run.log(metrics, step=step)

    def histogram(self, values: np.ndarray) -> Any:
        return self._wandb.Histogram(np.asarray(values, dtype=np.float64))

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self.enabled:
            self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def images(self, paths: dict[str, Path]) -> None:
        """Log image files (e.g. the report's PNG figures) under these names."""
        if self.enabled and paths:
            self.run.log({name: self._wandb.Image(str(path)) for name, path in paths.items()})

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()
        os.environ.pop("WANDB_SERVICE", None)
