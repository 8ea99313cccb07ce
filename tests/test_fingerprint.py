"""A checkpoint's fingerprint (vllm_plugin/fingerprint.py), which sample runs record to refuse
a resume on other models: equal for a copy, different for a fine-tuned checkpoint (every
weight moved by 1e-3 relative, as a training step moves them) and for another config."""
from __future__ import annotations

import json
import shutil

from dual_sampling.models.tiny_models import perturbed_checkpoint
from dual_sampling.vllm_plugin.fingerprint import fingerprint


def test_fingerprint_tells_checkpoints_apart(tiny_models, tmp_path):
    theta = tiny_models["theta"]
    copy = shutil.copytree(theta, tmp_path / "copy")
    assert fingerprint(str(theta)) == fingerprint(str(copy)) is not None
    assert fingerprint(str(theta)) != fingerprint(str(tiny_models["target"]))
    tuned = perturbed_checkpoint(theta, tmp_path / "tuned", scale=1e-3, seed=0)
    assert fingerprint(str(tuned)) != fingerprint(str(theta))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    assert fingerprint(str(copy)) != fingerprint(str(theta))  # cache keyed by mtime and size
    assert fingerprint("no-such-org/no-such-model") is None
    assert fingerprint(str(tmp_path / "empty")) is None
