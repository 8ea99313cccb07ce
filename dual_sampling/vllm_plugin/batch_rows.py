"""Per-request rows of a V1 logits processor, kept by batch index through vLLM's BatchUpdate
(fused/sampler.py's and full_logits.py's processors both follow the batch this way)."""
from __future__ import annotations

from typing import Any, Callable, Optional

from vllm.v1.sample.logits_processor import MoveDirectionality


def apply_moves(rows: dict[int, Any], moved: Any,
                on_dropped: Optional[Callable[[Any], None]] = None) -> None:
    """BatchUpdate.moved on `rows` (batch index -> row): SWAP exchanges two indices' rows; a
    one-way move takes a's row to b, and b's row, if any, leaves (`on_dropped(row)`)."""
    for a, b, direction in moved:
        row_a, row_b = rows.pop(a, None), rows.pop(b, None)
        if row_a is not None:
            rows[b] = row_a
        if row_b is None:
            continue
        if direction == MoveDirectionality.SWAP:
            rows[a] = row_b
        elif on_dropped is not None:
            on_dropped(row_b)
