"""Shared fixtures: the tiny model pair, and real vLLM CPU servers started once per session.

Servers are started with the project's own `start_vllm.sh` (so the script is under test
too), on free loopback ports, and stopped at the end of the session.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dual_sampling.serving.launch import Servers, free_port  # noqa: F401  (tests import them here)

os.environ.setdefault("WANDB_SILENT", "true")
try:  # the suite compiles the fused kernels (kernels.py) for many shapes in ONE process (the
    # exact session coordinator, test_fused_math, test_fused_sampler); past dynamo's default
    # recompile limit of 8 a kernel falls back to eager mid-module, and runs that must agree
    # to the last bit (V1 against V2 in test_fused_sampler) differ by float32 rounding
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
except ImportError:
    pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """`{"theta": dir, "target": dir}`, built once (cached across sessions)."""
    from dual_sampling.models.tiny_models import ensure_tiny_models
    return ensure_tiny_models()


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """The real pair (SmolLM2-135M-Instruct and a distilled 12-layer theta), built once."""
    from dual_sampling.models.real_models import ensure_real_models
    return ensure_real_models()


@pytest.fixture(scope="module")
def real_reference(real_models):
    """transformers on the real pair's float32 weights (per module: 0.8 GB, freed after)."""
    from dual_sampling.models.reference import Reference
    return Reference(real_models)


@pytest.fixture(scope="session")
def servers(tiny_models, tmp_path_factory) -> Servers:
    """theta and target servers (with this package's plugin), up for the whole session."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    pair = Servers(run_dir=tmp_path_factory.mktemp("vllm"), models=dict(tiny_models))
    pair.start("theta", "target")
    yield pair
    pair.stop()


@pytest.fixture(scope="session")
def fused_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """theta, and the tiny target with its vocabulary padded from 1024 to 1088 output rows
    (zero rows, as checkpoints pad them): the fused server must never sample a padded id."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    padded = tmp_path_factory.mktemp("padded_target")
    for item in Path(tiny_models["target"]).iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy(item, padded / item.name)
    weights = load_file(Path(tiny_models["target"]) / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = weights[name]
        weights[name] = torch.cat([rows, torch.zeros(64, rows.shape[1], dtype=rows.dtype)])
    save_file(weights, padded / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((padded / "config.json").read_text())
    config["vocab_size"] = 1088
    (padded / "config.json").write_text(json.dumps(config, indent=2))
    return {"theta": Path(tiny_models["theta"]), "target": padded}


@pytest.fixture(scope="session")
def fused_server(fused_models, tmp_path_factory) -> Servers:
    """One fused server (theta + padded target in one engine), up for the whole session."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    # a small step budget, so that a long prompt is prefilled in chunks (a test covers it)
    server = Servers(run_dir=tmp_path_factory.mktemp("vllm_fused"), models=dict(fused_models),
                     extra=("--max-model-len", "2048", "--max-num-batched-tokens", "512"))
    server.start_fused()
    yield server
    server.stop()



@pytest.fixture(scope="session")
def spec_server(fused_models, tmp_path_factory) -> Servers:
    """One speculative fused server (theta drafts 3 tokens a step; tests/test_speculative.py
    checks that number), up for the whole session."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    # the step budget of fused_server: a long prompt is prefilled in chunks
    server = Servers(run_dir=tmp_path_factory.mktemp("vllm_spec"), models=dict(fused_models),
                     extra=("--max-model-len", "2048", "--max-num-batched-tokens", "512"))
    server.start_fused(speculate=3)
    yield server
    server.stop()

WIDE_VOCAB = 151936  # Qwen's vocabulary size


@pytest.fixture(scope="session")
def wide_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny pair with its tokenizer and models widened to 151,936 ids (real rows: a long
    LM-like tail that carries mass, see tiny_models.widen_vocabulary)."""
    from dual_sampling.models.tiny_models import widen_vocabulary
    return widen_vocabulary(dict(tiny_models), tmp_path_factory.mktemp("wide") / "pair",
                            WIDE_VOCAB)


@pytest.fixture(scope="session")
def wide_fused_server(wide_models, tmp_path_factory) -> Servers:
    """One fused server on the 151,936-id pair, up for the whole session."""
    if shutil.which("curl") is None:
        pytest.fail("start_vllm.sh needs curl: apt-get install curl")
    server = Servers(run_dir=tmp_path_factory.mktemp("vllm_wide"), models=dict(wide_models),
                     extra=("--max-model-len", "1024"))
    server.start_fused()
    yield server
    server.stop()


REAL_EXACT_TEXTS = ("The capital of France is", "Autumn leaves fall because",
                    "A good way to stay focused is", "The sky is blue because")


class RealFused:
    """The real fused server, shared by tests/test_real_fused.py and the draws that
    tests/test_real_pair.py's exact session path must match: it starts on first use, takes
    the draws from the fresh server at once (before any test loads another theta into it),
    and `stop()` frees its memory before the real pair starts (never up together)."""

    def __init__(self, models: dict[str, Path], run_dir: Path) -> None:
        self.models, self.run_dir = models, run_dir
        self._server: Servers | None = None
        self._draws: dict | None = None

    def server(self) -> Servers:
        if self._server is None:
            self._server = Servers(run_dir=self.run_dir, models=dict(self.models),
                                   extra=("--max-model-len", "2048"))
            self._server.start_fused()
            if self._draws is None:
                self._draws = self._take_draws(self._server)
        return self._server

    def draws(self) -> dict:
        """The real fused engine's completions of REAL_EXACT_TEXTS at seed 4 (alpha*,
        T = 0.7, 24 tokens, EOS ignored)."""
        if self._draws is None:
            self.server()
        return self._draws

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _take_draws(self, server: Servers) -> dict:
        import json
        import urllib.request

        from transformers import AutoTokenizer

        from dual_sampling.core.coordinator import prompt_seed
        from dual_sampling.wire.fused_format import GENERATE_PATH
        tokenizer = AutoTokenizer.from_pretrained(str(self.models["target"]))
        prompts = [tokenizer(text)["input_ids"] for text in REAL_EXACT_TEXTS]
        body = {"prompts": prompts, "seeds": [prompt_seed(4, i) for i in range(len(prompts))],
                "max_tokens": 24, "temperature": 0.7, "ignore_eos": True}
        request = urllib.request.Request(server.url("fused") + GENERATE_PATH,
                                         json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=900) as reply:
            results = json.loads(reply.read())["results"]
        return {"prompts": prompts, "seed": 4, "temperature": 0.7, "results": results}


@pytest.fixture(scope="session")
def real_fused_engine(real_models, tmp_path_factory) -> RealFused:
    engine = RealFused(real_models, tmp_path_factory.mktemp("vllm_real_fused"))
    yield engine
    engine.stop()


@pytest.fixture
def real_fused(real_fused_engine) -> Servers:
    """The real fused server (started on first use, one for the session)."""
    return real_fused_engine.server()


@pytest.fixture(scope="session")
def real_fused_draws(real_fused_engine) -> dict:
    """RealFused.draws: what tests/test_real_pair.py's exact session path must match."""
    return real_fused_engine.draws()
