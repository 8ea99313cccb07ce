"""Wire format of the session protocol (`/v1/dual_sampling/session`): binary frames, no I/O.

Shared by the server route (dual_sampling/vllm_plugin/session.py) and the client
(dual_sampling/core/transports/session.py). Every number is little-endian; `sid` is a session id
the client picks (unique among its open sessions on that connection).

Client -> server, int32 words:

    OPEN   [1, msg_id, k, n, sid[n], len[n], tokens[sum(len)]]   new sessions, whole prompts
    STEP   [2, msg_id, k, n, sid[n], len[n], tokens[sum(len)]]   tokens appended to open ones
    CLOSE  [3, msg_id, n, sid[n]]                                 end these sessions
    ABORT  [4, msg_id]                                            end all the connection's sessions

`k = 0` (FULL) asks for the whole next-token distribution instead of a top-k; a session
opened with k = 0 keeps it (the exact transport), one opened with k >= 1 keeps a top-k.

Server -> client:

    OPEN/STEP reply  int32 [op, msg_id, n, k] + int32 ids[n*k] + float32 logprobs[n*k]
                     row i is the top-k after session sid[i]'s tokens, by decreasing logprob
                     (the model's raw logprobs, nats)
    FULL reply       int32 [op, msg_id, n, 0, V, dtype] + rows[n*V] in that dtype
                     row i is the model's logits over the tokenizer's V ids after session
                     sid[i]'s tokens, as the engine computed them (unnormalised; dtype
                     0 = float32, 1 = bfloat16, 2 = float16, little-endian)
    CLOSE/ABORT ack  int32 [op, msg_id, n_closed]
    error            a text frame, JSON {"msg_id": m, "error": "..."}; m = -1 when it
                     concerns the connection rather than one message
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

PATH = "/v1/dual_sampling/session"
OPEN, STEP, CLOSE, ABORT = 1, 2, 3, 4
OP_NAMES = {OPEN: "OPEN", STEP: "STEP", CLOSE: "CLOSE", ABORT: "ABORT"}
WORD = np.dtype("<i4")
LOGP = np.dtype("<f4")
FULL = 0  # k of the exact transport: the whole distribution
ROW_DTYPES = {0: "float32", 1: "bfloat16", 2: "float16"}  # code -> torch dtype name
_ROW_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class SessionFormatError(ValueError):
    """A frame that does not follow the layout above."""


@dataclass
class Chunks:
    """An OPEN or STEP message: for each session, the tokens it receives."""

    op: int
    msg_id: int
    k: int
    sids: np.ndarray  # (n,) int32
    lengths: np.ndarray  # (n,) int32
    tokens: np.ndarray  # (sum(lengths),) int32

    def per_session(self) -> list[list[int]]:
        return [chunk.tolist() for chunk in np.split(self.tokens, np.cumsum(self.lengths)[:-1])]


def encode_chunks(op: int, msg_id: int, k: int, sids: list[int], chunks: list[list[int]]
                  ) -> bytes:
    lengths = [len(chunk) for chunk in chunks]
    header = np.array([op, msg_id, k, len(sids), *sids, *lengths], dtype=WORD)
    tokens = np.fromiter((t for chunk in chunks for t in chunk), dtype=WORD, count=sum(lengths))
    return header.tobytes() + tokens.tobytes()


def encode_close(op: int, msg_id: int, sids: list[int]) -> bytes:
    words = [op, msg_id] if op == ABORT else [op, msg_id, len(sids), *sids]
    return np.array(words, dtype=WORD).tobytes()


def _words(frame: bytes) -> np.ndarray:
    if len(frame) % 4 or len(frame) < 8:
        raise SessionFormatError(f"a {len(frame)}-byte frame is not a whole number (>= 2) of "
                                 f"int32 words")
    return np.frombuffer(frame, dtype=WORD)


def request_header(frame: bytes) -> tuple[int, int]:
    """(op, msg_id) of any client frame."""
    words = _words(frame)
    if int(words[0]) not in OP_NAMES:
        raise SessionFormatError(f"unknown op {int(words[0])}; expected one of {OP_NAMES}")
    return int(words[0]), int(words[1])


def decode_chunks(frame: bytes) -> Chunks:
    words = _words(frame)
    if len(words) < 4:
        raise SessionFormatError("an OPEN/STEP frame needs [op, msg_id, k, n]")
    op, msg_id, k, n = (int(w) for w in words[:4])
    if n < 1 or len(words) < 4 + 2 * n:
        raise SessionFormatError(f"n={n} sessions do not fit a {len(words)}-word frame")
    sids, lengths = words[4:4 + n], words[4 + n:4 + 2 * n]
    tokens = words[4 + 2 * n:]
    if (lengths < 1).any() or int(lengths.sum()) != len(tokens):
        raise SessionFormatError(f"lengths {lengths[:8].tolist()}... (each >= 1) do not add up "
                                 f"to the {len(tokens)} tokens in the frame")
    return Chunks(op, msg_id, k, sids, lengths, tokens)


def decode_close(frame: bytes) -> list[int]:
    words = _words(frame)
    if int(words[0]) == ABORT:
        return []
    if len(words) < 3 or len(words) != 3 + int(words[2]):
        raise SessionFormatError(f"a CLOSE frame of {len(words)} words does not hold "
                                 f"[op, msg_id, n, sid[n]]")
    return words[3:].tolist()


def encode_topk(op: int, msg_id: int, ids: np.ndarray, logp: np.ndarray) -> bytes:
    n, k = ids.shape
    return (np.array([op, msg_id, n, k], dtype=WORD).tobytes()
            + ids.astype(WORD, copy=False).tobytes() + logp.astype(LOGP, copy=False).tobytes())


def decode_topk(frame: bytes) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(op, msg_id, ids (n, k) int32, logprobs (n, k) float32) of an OPEN/STEP reply."""
    words = _words(frame)
    if len(words) < 4:
        raise SessionFormatError("a top-k reply needs [op, msg_id, n, k]")
    op, msg_id, n, k = (int(w) for w in words[:4])
    if len(frame) != 16 + 8 * n * k:
        raise SessionFormatError(f"a top-k reply for n={n}, k={k} has {len(frame)} bytes, "
                                 f"not {16 + 8 * n * k}")
    ids = np.frombuffer(frame, dtype=WORD, count=n * k, offset=16).reshape(n, k)
    logp = np.frombuffer(frame, dtype=LOGP, count=n * k, offset=16 + 4 * n * k).reshape(n, k)
    return op, msg_id, ids, logp


def encode_full(op: int, msg_id: int, rows: bytes, n: int, width: int, dtype: str) -> bytes:
    """A FULL reply; `rows` holds n x width values of the dtype, little-endian."""
    code = {name: c for c, name in ROW_DTYPES.items()}[dtype]
    return np.array([op, msg_id, n, FULL, width, code], dtype=WORD).tobytes() + rows


def decode_full(frame: bytes) -> tuple[int, int, memoryview, int, int, str]:
    """(op, msg_id, payload, n, V, dtype name) of a FULL reply; the payload is a view."""
    words = _words(frame[:24] if len(frame) >= 24 else frame)
    if len(words) < 6 or int(words[3]) != FULL:
        raise SessionFormatError("a full-distribution reply needs [op, msg_id, n, 0, V, dtype]")
    op, msg_id, n, _, width, code = (int(w) for w in words[:6])
    dtype = ROW_DTYPES.get(code)
    if dtype is None:
        raise SessionFormatError(f"unknown row dtype code {code}; expected one of {ROW_DTYPES}")
    if len(frame) != 24 + n * width * _ROW_BYTES[dtype]:
        raise SessionFormatError(f"a full reply for n={n}, V={width} ({dtype}) has "
                                 f"{len(frame)} bytes, not {24 + n * width * _ROW_BYTES[dtype]}")
    return op, msg_id, memoryview(frame)[24:], n, width, dtype


def is_full(frame: bytes) -> bool:
    """Whether an OPEN/STEP reply is a FULL reply (its k word is 0)."""
    return len(frame) >= 16 and int(np.frombuffer(frame, dtype=WORD, count=4)[3]) == FULL


def encode_ack(op: int, msg_id: int, n_closed: int) -> bytes:
    return np.array([op, msg_id, n_closed], dtype=WORD).tobytes()


def encode_error(msg_id: int, message: str) -> str:
    return json.dumps({"msg_id": msg_id, "error": message})


def decode_error(text: str) -> tuple[int, str]:
    try:
        body = json.loads(text)
        return int(body["msg_id"]), str(body["error"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SessionFormatError(f"an error frame that is not JSON with msg_id and error: "
                                 f"{text[:200]!r}") from exc
