"""Server side: routes this package adds to a vLLM OpenAI server, with no fork of vLLM.

Registered under vLLM's `vllm.endpoint_plugins` entry-point group (see pyproject.toml) and
loaded only when the server runs with `VLLM_PLUGINS=dual_sampling` (start_vllm.sh sets it).
Each module in `ROUTE_MODULES` exposes a FastAPI `router`. `register_general` is the
`vllm.general_plugins` hook, which vLLM runs in every process of a server (API server,
engine core, workers): engine processes that die with their parent (lifetime.py), the
engine tunings (tuning.py) and the composite two-model class of fused servers
(fused/model.py), registered by name: it is imported only by a fused server.
"""
from __future__ import annotations

import importlib
from argparse import Namespace
from typing import Any

ROUTE_MODULES = ("info", "topk", "session", "fused.route", "theta_route")
ROUTE_FEATURES = {"session": "sessions"}  # route module -> the compat feature it needs


def route_modules() -> list[str]:
    """The route modules this vLLM can serve (compat.py: a missing private name drops one)."""
    from dual_sampling.vllm_plugin import compat
    return [m for m in ROUTE_MODULES if m not in ROUTE_FEATURES or compat.usable(ROUTE_FEATURES[m])]


class DualSamplingPlugin:
    """The `vllm.endpoint_plugins` object: attaches this package's routers."""

    name = "dual_sampling"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from dual_sampling.vllm_plugin.theta_route import ThetaGate
        for module in route_modules():
            app.include_router(importlib.import_module(f"{__name__}.{module}").router)
        app.add_middleware(ThetaGate)  # load_theta's door and version stamp

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.dual_sampling_args = args
        from dual_sampling.vllm_plugin import theta_route
        from dual_sampling.vllm_plugin.fused import route
        theta_route.init_state(state, engine_client.model_config,
                               str(engine_client.model_config.served_model_name))
        if route.is_fused(engine_client):
            state.dual_sampling_engine = await route.check_engine(engine_client)


def make_plugin() -> DualSamplingPlugin:
    return DualSamplingPlugin()


def register_general() -> None:
    """The `vllm.general_plugins` hook: runs in every vLLM process named by VLLM_PLUGINS."""
    from vllm import ModelRegistry

    from dual_sampling.vllm_plugin import compat, lifetime, tuning
    from dual_sampling.vllm_plugin.fused.setup import ARCHITECTURE
    lifetime.bind_engine_process()  # first: the sooner it is armed, the shorter the window
    compat.warn_if_unpinned()
    tuning.register()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, f"dual_sampling.vllm_plugin.fused.model:{ARCHITECTURE}")
