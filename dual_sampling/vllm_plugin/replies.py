"""Error replies and the engine-task gather that this plugin's HTTP routes share."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse
from vllm.exceptions import VLLMClientError


def error(status: int, message: str, kind: str | None = None) -> JSONResponse:
    """An error body in vLLM's own shape, so clients read it as they read vLLM's; `kind`
    (the body's `type`) defaults to vLLM's for the status."""
    kind = kind or ("BadRequestError" if status < 500 else "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


async def gather_or_error(tasks: list[asyncio.Future], path: str,
                          refused: tuple[type[BaseException], ...] = (VLLMClientError,)
                          ) -> list[Any] | JSONResponse:
    """The tasks' results in order; or a 400 (the engine refused one) or a 500 (anything
    else: the server stays up and the client sees what failed). Unfinished tasks are cancelled."""
    try:
        return await asyncio.gather(*tasks)
    except refused as exc:
        return error(400, f"the engine refused the request: {exc}")
    except Exception as exc:
        return error(500, f"{path} failed: {type(exc).__name__}: {exc}")
    finally:
        for task in tasks:
            task.cancel()
