"""scripts/gpu_check.sh --cpu: the GPU check's own code path, kept working by CI on CPU.

Tiny shapes (theta 2 KV heads x 64 over 2 layers, target 4 x 128 over 3), few prompts and
tokens, three vLLM CPU servers one at a time (native theta, native target, fused): about
three minutes on an idle 2-core machine (one server start-up is most of a minute), up to 15
on a loaded one. On a GPU the same script runs the real shapes (README: On a GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
@pytest.mark.timeout(1800)  # three server start-ups: about 1 min each on an idle 2-core box,
def test_gpu_check_runs_on_cpu_and_writes_its_table(tmp_path):  # 4-5 min on a loaded one
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--prompts", "4", "16",
         "--max-tokens", "12", "--check-sequences", "2", "--work-dir", str(tmp_path / "work")],
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")},
        capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["passed"] and report["device"] == "cpu"
    assert set(report["tok_s"]) == {"native theta", "native target", "fused alpha*",
                                    "fused alpha=0.5", "fused alpha* speculative K=4"}
    assert all(v > 0 for by_n in report["tok_s"].values() for v in by_n.values())
    # 2 sequences of 12 tokens from the fused server and 2 from the speculative one
    assert report["max_abs_difference"]["positions"] == 2 * (2 * 12)
    assert report["engine"]["kv_cache"]["groups"][0]["bytes_per_token"] == 2048 + 12288
    swap = report["load_theta"]
    assert swap["round_trip_identical"] and swap["other_policy_differs"] and swap["load_s"] > 0
    assert "fused alpha* / native target" in done.stdout
    assert "draft acceptance" in done.stdout
    assert not list((tmp_path / "work").glob("vllm-*/*.pid"))  # every server stopped
