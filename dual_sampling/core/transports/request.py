"""The request transport: a `/v1/completions` request per step and server (any vLLM server).

Implements the coordinator's per-token `Transport` protocol (dual_sampling/core/coordinator.py).
"""
from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np

from dual_sampling.clients.client import VLLMClient


class RequestTransport:
    """A `/v1/completions` request per step and server, the whole batch in one request.

    Stateless: every step re-sends each whole context (vLLM's prefix cache saves most of
    the recomputation), so it works with any stock vLLM server.
    """

    def __init__(self, theta: VLLMClient, target: VLLMClient) -> None:
        self.theta, self.target = theta, target

    async def step(self, keys: list[int], contexts: list[list[int]], k: int,
                   target_contexts: Optional[list[list[int]]] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        (ids_theta, logp_theta), (ids_target, logp_target) = await asyncio.gather(
            self.theta.next_token_topk(contexts, k),
            self.target.next_token_topk(target_contexts or contexts, k))
        return ids_theta, logp_theta, ids_target, logp_target

    async def release(self, keys: list[int]) -> None:
        return None

    async def aclose(self) -> None:
        return None
