"""The top-k format shared by the `/v1/topk` route, the client and the cache: pure numpy.

One sequence of L tokens has n = L - 1 scored positions; row j scores token j+1 given
tokens 0..j. Per row: the k most likely next-token ids and their logprobs (natural log,
nats), sorted by decreasing logprob, and the logprob of the actual next token.

Logprob storage (`fmt`) and its error bound, for a stored x̂ of a logprob x:
  int8  per row, codes c in [-127, 127] with x̂ = offset + scale * c, where
        offset = (hi + lo) / 2 and scale = (hi - lo) / 254 over the row's finite top-k
        values [lo, hi] (float32). Code -128 is -inf, exactly (hence 254 steps, not 255).
        Bound:
            |x̂ - x| <= (hi - lo) / 508 + 2**-21 * max(|hi|, |lo|) + 2**-126
        (the last two terms are float32 rounding). 1 byte per entry + 8 bytes per row.
  fp16  IEEE half: |x̂ - x| <= 2**-11 * |x| + 2**-25; finite values below -65504 clip to
        -65504; -inf stays -inf.
  bf16  bfloat16 (stored as its uint16 bits), round to nearest even:
        |x̂ - x| <= 2**-8 * |x| + 2**-126.
The actual-token logprob is float32, exact. Ids are uint16 when the vocabulary has at most
65536 entries, else int32.

Binary body of `/v1/topk` (content type `CONTENT_TYPE`), little-endian throughout:

  header, 20 bytes:  magic b"DSTK" | u16 version (1) | u8 fmt (0 int8, 1 fp16, 2 bf16)
                     | u8 id dtype (0 uint16, 1 int32) | u32 n_seq | u32 k | u32 vocab_size
  then n_seq sequence records, each starting 4-byte aligned:
    u32 L                        tokens in the sequence (n = L - 1 rows)
    f32[n] actual                logprob of the actual next token
    f32[n] scale, f32[n] offset  int8 only
    id[n*k] ids                  (n, k) row-major
    val[n*k] values              (n, k): int8 codes | float16 | bfloat16 bits (uint16)
    zero padding to a multiple of 4 bytes

The cache written by `mode=topk` keeps each sequence's record zlib-compressed inside
safetensors shards (section "the on-disk cache" below).
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dual_sampling.errors import DualSamplingError

MAGIC = b"DSTK"
VERSION = 1
CONTENT_TYPE = f"application/x-dual-sampling-topk; version={VERSION}"
FORMATS = ("int8", "fp16", "bf16")
HEADER = struct.Struct("<4sHBBIII")
LENGTH = struct.Struct("<I")
ID_DTYPES = (np.dtype("<u2"), np.dtype("<i4"))
VALUE_DTYPES = {"int8": np.dtype("i1"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
INT8_STEPS = 254
NEG_INF_CODE = -128
FP16_MIN = float(np.finfo(np.float16).min)


class TopkFormatError(DualSamplingError, ValueError):
    """A top-k body or cache record is malformed, or values cannot be encoded."""


@dataclass
class TopkResult:
    """One sequence's teacher top-k, decoded: what a distillation loss reads."""

    ids: np.ndarray
    """(L-1, k) int64 top-k token ids per position, by decreasing logprob."""
    logp: np.ndarray
    """(L-1, k) float32 their logprobs (nats), dequantised."""
    actual: np.ndarray
    """(L-1,) float32 logprob of the actual next token, exact."""


@dataclass
class EncodedTopk:
    """One sequence's top-k as stored on the wire and in the cache."""

    fmt: str
    ids: np.ndarray
    """(n, k) uint16 or int32."""
    values: np.ndarray
    """(n, k) int8 codes, float16, or bfloat16 bits as uint16."""
    actual: np.ndarray
    """(n,) float32."""
    scale: Optional[np.ndarray] = None
    """(n,) float32, int8 only."""
    offset: Optional[np.ndarray] = None
    """(n,) float32, int8 only."""

    @property
    def num_rows(self) -> int:
        return int(self.actual.shape[0])

    @property
    def record_size(self) -> int:
        """Bytes of this sequence's record in the body format (`len(encode_sequence(self))`)."""
        per_row = 4 * (3 if self.fmt == "int8" else 1)
        size = LENGTH.size + self.num_rows * per_row + self.ids.nbytes + self.values.nbytes
        return size + (-size % 4)

    @classmethod
    def encode(cls, ids: np.ndarray, logp: np.ndarray, actual: np.ndarray, fmt: str,
               id_dtype: np.dtype) -> "EncodedTopk":
        """Store `ids (n, k)`, `logp (n, k)` and `actual (n,)` in format `fmt`."""
        check_format(fmt)
        logp = np.asarray(logp, dtype=np.float32)
        scale = offset = None
        if fmt == "int8":
            values, scale, offset = quantise_int8(logp)
        elif fmt == "fp16":
            values = np.where(np.isfinite(logp), np.maximum(logp, FP16_MIN), logp
                              ).astype(np.float16)
        else:
            values = float32_to_bf16_bits(logp)
        return cls(fmt, np.asarray(ids).astype(id_dtype, copy=False), values,
                   np.asarray(actual, dtype=np.float32), scale, offset)

    def with_id_dtype(self, id_dtype: np.dtype) -> "EncodedTopk":
        """The same sequence with ids stored as `id_dtype` (the fallback path gives int32)."""
        return dataclasses.replace(self, ids=self.ids.astype(id_dtype, copy=False))

    def logprobs(self) -> np.ndarray:
        """(n, k) float32 dequantised logprobs."""
        if self.fmt == "int8":
            return dequantise_int8(self.values, self.scale, self.offset)
        if self.fmt == "fp16":
            return self.values.astype(np.float32)
        return bf16_bits_to_float32(self.values)

    def decode(self) -> TopkResult:
        return TopkResult(self.ids.astype(np.int64), self.logprobs(),
                          self.actual.astype(np.float32, copy=False))


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TopkFormatError(f"top-k format {fmt!r} is unknown: choose one of {FORMATS}.")


def id_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest id type for ids in [0, vocab_size)."""
    return ID_DTYPES[0] if vocab_size <= 1 << 16 else ID_DTYPES[1]


ERROR_BOUNDS = {
    "int8": "|x_hat - x| <= (hi - lo)/508 + 2**-21*max(|hi|,|lo|) + 2**-126 over the row's "
            "finite top-k [lo, hi]",
    "fp16": "|x_hat - x| <= 2**-11*|x| + 2**-25",
    "bf16": "|x_hat - x| <= 2**-8*|x| + 2**-126",
}


def error_bound(logp: np.ndarray, fmt: str) -> np.ndarray:
    """Per-entry bound on |x̂ - x| for exact logprobs `logp (n, k)` stored in `fmt`."""
    logp = np.asarray(logp, dtype=np.float64)
    finite = np.isfinite(logp)
    if fmt == "int8":
        hi = np.where(finite, logp, -np.inf).max(axis=-1, initial=-np.inf)  # (n,)
        lo = np.where(finite, logp, np.inf).min(axis=-1, initial=np.inf)  # (n,)
        hi, lo = np.where(np.isfinite(hi), hi, 0.0), np.where(np.isfinite(lo), lo, 0.0)
        bound = ((hi - lo) / (2 * INT8_STEPS) + 2.0 ** -21 * np.maximum(abs(hi), abs(lo))
                 + 2.0 ** -126)
        return np.broadcast_to(bound[:, None], logp.shape)
    magnitude = np.where(finite, np.abs(logp), 0.0)
    if fmt == "fp16":
        return 2.0 ** -11 * magnitude + 2.0 ** -25
    return 2.0 ** -8 * magnitude + 2.0 ** -126


# -- int8 and bfloat16 ---------------------------------------------------------------------
def quantise_int8(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine int8 per row over the row's finite [lo, hi]; -inf becomes code -128.

    Returns `codes (n, k) int8`, `scale (n,) float32`, `offset (n,) float32`. Raises
    TopkFormatError on NaN or +inf (a logprob is never either).
    """
    x = np.asarray(logp, dtype=np.float64)  # (n, k)
    if np.isnan(x).any() or np.isposinf(x).any():
        raise TopkFormatError("logprobs to quantise hold NaN or +inf; a logprob is <= 0.")
    finite = np.isfinite(x)
    hi = np.where(finite, x, -np.inf).max(axis=-1, initial=-np.inf)  # (n,)
    lo = np.where(finite, x, np.inf).min(axis=-1, initial=np.inf)  # (n,)
    empty = ~np.isfinite(hi)  # a row of -inf only
    hi, lo = np.where(empty, 0.0, hi), np.where(empty, 0.0, lo)
    offset = ((hi + lo) / 2).astype(np.float32)  # (n,)
    scale = ((hi - lo) / INT8_STEPS).astype(np.float32)  # (n,)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]  # (n, 1)
    codes = np.rint((x - offset.astype(np.float64)[:, None]) / safe)  # (n, k)
    codes = np.where(finite, np.clip(codes, -INT8_STEPS // 2, INT8_STEPS // 2), NEG_INF_CODE)
    return codes.astype(np.int8), scale, offset


def dequantise_int8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(n, k) float32 from int8 `codes (n, k)`, `scale (n,)`, `offset (n,)`."""
    x = offset.astype(np.float64)[:, None] + scale.astype(np.float64)[:, None] * codes  # (n, k)
    return np.where(codes == NEG_INF_CODE, -np.inf, x).astype(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 `x`, rounded to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# -- binary records ------------------------------------------------------------------------
def encode_sequence(seq: EncodedTopk) -> bytes:
    """One sequence record (see the module docstring), padded to 4 bytes."""
    parts = [LENGTH.pack(seq.num_rows + 1), seq.actual.astype("<f4").tobytes()]
    if seq.fmt == "int8":
        parts += [seq.scale.astype("<f4").tobytes(), seq.offset.astype("<f4").tobytes()]
    parts += [np.ascontiguousarray(seq.ids).tobytes(), np.ascontiguousarray(seq.values).tobytes()]
    size = sum(map(len, parts))
    parts.append(b"\0" * (-size % 4))
    return b"".join(parts)


def decode_sequence(buf: bytes | memoryview, pos: int, k: int, fmt: str,
                    id_dtype: np.dtype) -> tuple[EncodedTopk, int]:
    """The record at byte `pos` of `buf` (arrays are views into it) and the next record's pos."""
    try:
        (length,) = LENGTH.unpack_from(buf, pos)
        if length < 1:
            raise TopkFormatError(f"sequence record at byte {pos} has length {length} < 1.")
        n = length - 1
        pos += LENGTH.size

        def take(dtype: np.dtype, count: int) -> np.ndarray:
            nonlocal pos
            array = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
            pos += array.nbytes
            return array

        actual = take(np.dtype("<f4"), n)
        scale = offset = None
        if fmt == "int8":
            scale, offset = take(np.dtype("<f4"), n), take(np.dtype("<f4"), n)
        ids = take(id_dtype, n * k).reshape(n, k)
        values = take(VALUE_DTYPES[fmt], n * k).reshape(n, k)
    except (struct.error, ValueError) as exc:
        if isinstance(exc, TopkFormatError):
            raise
        raise TopkFormatError(f"sequence record at byte {pos} is truncated ({exc}).") from exc
    return EncodedTopk(fmt, ids, values, actual, scale, offset), pos + (-pos % 4)


@dataclass(frozen=True)
class BodyHeader:
    fmt: str
    id_dtype: np.dtype
    n_seq: int
    k: int
    vocab_size: int


def encode_body(sequences: Sequence[EncodedTopk], k: int, fmt: str, vocab_size: int) -> bytes:
    """The whole `/v1/topk` binary body for `sequences` (all in `fmt`, ids for `vocab_size`)."""
    id_dtype = id_dtype_for_vocab(vocab_size)
    header = HEADER.pack(MAGIC, VERSION, FORMATS.index(fmt), ID_DTYPES.index(id_dtype),
                         len(sequences), k, vocab_size)
    return header + b"".join(encode_sequence(seq) for seq in sequences)


def decode_body(body: bytes | memoryview) -> tuple[BodyHeader, list[EncodedTopk]]:
    """Parse a binary body; raises TopkFormatError naming what is wrong."""
    if len(body) < HEADER.size:
        raise TopkFormatError(f"top-k body of {len(body)} bytes is shorter than its header.")
    magic, version, fmt_code, id_code, n_seq, k, vocab_size = HEADER.unpack_from(body, 0)
    if magic != MAGIC:
        raise TopkFormatError(f"top-k body starts with {magic!r}, not {MAGIC!r}: not this format.")
    if version != VERSION or fmt_code >= len(FORMATS) or id_code >= len(ID_DTYPES):
        raise TopkFormatError(f"top-k body has version {version}, format code {fmt_code}, id "
                              f"code {id_code}; this client reads version {VERSION}: upgrade "
                              f"dual_sampling on the client or the server so they match.")
    header = BodyHeader(FORMATS[fmt_code], ID_DTYPES[id_code], n_seq, k, vocab_size)
    sequences, pos = [], HEADER.size
    for _ in range(n_seq):
        seq, pos = decode_sequence(body, pos, k, header.fmt, header.id_dtype)
        sequences.append(seq)
    if pos != len(body):
        raise TopkFormatError(f"top-k body has {len(body) - pos} bytes after its last record.")
    return header, sequences


# -- the on-disk cache ---------------------------------------------------------------------
# A cache directory holds `manifest.json`, `index.jsonl` and shards `shard-NNNNNN.safetensors`
# (written by dual_sampling.modes.topk, read by dual_sampling.files.topk_dataset). A shard's tensors:
#   sequence_ids (m,) int64     each sequence's position in the run's input
#   token_offsets (m+1,) int64  sequence i's input ids are input_ids[token_offsets[i]:...[i+1]]
#   input_ids (sum L,)          id dtype
#   record_offsets (m+1,) int64 sequence i's record is records[record_offsets[i]:...[i+1]]
#   records (bytes,) uint8      per sequence: zlib(one sequence record of the body format)
# and string metadata: format_version, k, fmt, id_dtype, compression.
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.jsonl"
SHARD_GLOB = "shard-*.safetensors"
CACHE_COMPRESSION = "zlib-1"
_ZLIB_LEVEL = 1


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.safetensors"


def shard_number(name: str) -> int:
    return int(name[len("shard-"):-len(".safetensors")])


def compress_record(seq: EncodedTopk) -> bytes:
    return zlib.compress(encode_sequence(seq), _ZLIB_LEVEL)


def shard_metadata(k: int, fmt: str, id_dtype: np.dtype) -> dict[str, str]:
    return {"format_version": str(VERSION), "k": str(k), "fmt": fmt,
            "id_dtype": np.dtype(id_dtype).name, "compression": CACHE_COMPRESSION}


def read_index(cache_dir: str | Path) -> list[dict[str, Any]]:
    """The complete lines of `index.jsonl`, one per shard (a partial last line is skipped)."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.exists():
        return []
    entries = []
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            entries.append(json.loads(line))
    return entries


class CacheShard:
    """Read access to one shard; records are read and decompressed one sequence at a time."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            meta = self._file.metadata() or {}
            self.k, self.fmt = int(meta["k"]), meta["fmt"]
            self.id_dtype = np.dtype(meta["id_dtype"]).newbyteorder("<")
            if meta.get("format_version") != str(VERSION) or \
                    meta.get("compression") != CACHE_COMPRESSION:
                raise TopkFormatError(f"shard {self.path} has format {meta.get('format_version')}"
                                      f"/{meta.get('compression')}; this version reads "
                                      f"{VERSION}/{CACHE_COMPRESSION}.")
            self.sequence_ids = self._file.get_tensor("sequence_ids")  # (m,)
            self.token_offsets = self._file.get_tensor("token_offsets")  # (m+1,)
            self.record_offsets = self._file.get_tensor("record_offsets")  # (m+1,)
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, TopkFormatError):
                raise
            raise TopkFormatError(f"shard {self.path} is unreadable ({exc}): delete it and "
                                  f"run the topk mode again to rewrite it.") from exc

    def __len__(self) -> int:
        return int(self.sequence_ids.shape[0])

    def input_ids(self, row: int) -> np.ndarray:
        """(L,) input token ids of the sequence in `row`."""
        return self._file.get_slice("input_ids")[self.token_offsets[row]:
                                                 self.token_offsets[row + 1]]

    def record(self, row: int) -> EncodedTopk:
        """The top-k of the sequence in `row`, in its stored form."""
        blob = self._file.get_slice("records")[self.record_offsets[row]:
                                               self.record_offsets[row + 1]]
        try:
            raw = zlib.decompress(blob.tobytes())
        except zlib.error as exc:
            raise TopkFormatError(f"shard {self.path} row {row}: corrupt record ({exc}).") from exc
        seq, _ = decode_sequence(raw, 0, self.k, self.fmt, self.id_dtype)
        return seq
