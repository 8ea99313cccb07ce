"""The package as cluster users get it: a wheel installed into a fresh venv, no checkout.

Builds the wheel from this checkout, installs it (with its core dependencies only: no vLLM,
no torch) into a new venv, and runs the console scripts from an empty directory, where
nothing of the checkout is on the path: the Hydra configs and start_vllm.sh must come from
the installed package.
"""
from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "WANDB_MODE": "disabled"}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    if check and done.returncode != 0:
        pytest.fail(f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding only the built wheel and its core dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp / "dist", ROOT], cwd=tmp)
    wheel = next((tmp / "dist").glob("dual_sampling-*.whl"))
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp)
    return bin_dir


@pytest.mark.install
def test_installed_wheel_finds_its_configs_and_launcher(installed, tmp_path):
    where = run([installed / "python", "-c", "import dual_sampling; print(dual_sampling.__file__)"],
                cwd=tmp_path).stdout
    assert str(ROOT) not in where and "site-packages" in where
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    job = run([installed / "dual-sampling", "--cfg", "job", "mode=sample",
               f"data.prompts={prompts}", "output_dir=out", "sample.top_k=50"], cwd=tmp_path).stdout
    assert "mode_name: sample" in job and "top_k: 50" in job
    launcher = run([installed / "dual-sampling-serve", "--help"], cwd=tmp_path).stdout
    assert "--theta MODEL --target MODEL" in launcher


@pytest.mark.install
def test_installed_wheel_reports_bad_input_in_one_line(installed, tmp_path):
    done = run([installed / "dual-sampling", "mode=sample", "data.prompts=missing.jsonl",
                "output_dir=out"], cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "ConfigError" in done.stderr and "data.prompts" in done.stderr
    assert "Traceback" not in done.stderr
