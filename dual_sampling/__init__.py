"""dual_sampling: RLHF data from two language models at once (see README.md).

`DualSampler` / `SyncDualSampler` (dual_sampling/api.py) are the Python API for training
loops; they are imported on first use, so vLLM's processes that load this package's plugin
do not pay for the client stack.
"""
from typing import Any

__all__ = ["DualSampler", "SyncDualSampler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dual_sampling import api
        return getattr(api, name)
    raise AttributeError(f"module 'dual_sampling' has no attribute {name!r}")
