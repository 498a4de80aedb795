"""A strict safetensors reader: the official parser's rules, or stricter.

File layout::

    [8 bytes: header length n, little endian][n bytes: JSON header][data buffer]

Promises:
- the header is bounded (100 MB, as the official parser) and parsed with
  `bounded_io.loads_json` (depth, integer and duplicate-key limits);
- every tensor entry has exactly `dtype`, `shape`, `data_offsets`; offsets,
  sorted, tile the data buffer from 0 to its end with no gap, overlap or
  trailing byte; each tensor's byte count equals its shape times its dtype;
- the header is checked before any tensor byte is read, and a tensor is read
  only when asked for (`SafetensorsFile.read`), so a huge or sparse file
  costs nothing until its header checks out;
- floating-point tensors must hold finite values (NaN/inf are refused);
- never pickle, never trusting an offset.

Knows nothing about segments, sessions or models.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from kvscope.engine.bounded_io import describe, loads_json, open_regular, read_exact
from kvscope.engine.errors import SegmentFileError

MAX_HEADER = 100_000_000
MAX_DIMS = 8
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
_FLOATS = ("F32", "F16", "BF16")


def json_int(x: Any) -> bool:
    """True for a JSON integer; `true`/`false` are not (Python counts bool as int)."""
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """An open safetensors file whose header has been checked."""

    def __init__(self, fh: IO[bytes], size: int, name: str) -> None:
        self.name = name
        self._fh = fh
        if size < 8:
            raise SegmentFileError(f"{name} is truncated: {size} bytes, not even a header length")
        (n,) = struct.unpack("<Q", read_exact(fh, 8, name))
        if n > MAX_HEADER or n > size - 8:
            raise SegmentFileError(
                f"{name}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit: "
                "truncated or not safetensors"
            )
        raw = read_exact(fh, n, name)
        if not raw.startswith(b"{"):
            raise SegmentFileError(f"{name}: header does not start with '{{': not safetensors")
        header = loads_json(raw, f"{name}: header", MAX_HEADER)
        if not isinstance(header, dict):
            raise SegmentFileError(f"{name}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SegmentFileError(f"{name}: metadata must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        self.tensors = {k: _spec(name, k, v) for k, v in header.items()}
        _check_tiling(name, list(self.tensors.values()), size - self.data_start)

    @property
    def data_bytes(self) -> int:
        return sum(t.end - t.begin for t in self.tensors.values())

    def read(self, key: str) -> np.ndarray:
        """Tensor `key` as numpy (F16/BF16 widened to float32); floats must be finite."""
        t = self.tensors[key]
        self._fh.seek(self.data_start + t.begin)
        arr = np.frombuffer(read_exact(self._fh, t.end - t.begin, self.name), _DTYPES[t.dtype]).reshape(t.shape)
        if t.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out = arr.astype(np.float32) if t.dtype in ("F16", "BF16") else arr.copy()
        if t.dtype in _FLOATS and not np.isfinite(out).all():
            raise SegmentFileError(f"{self.name}: tensor {key!r} holds NaN or infinite values")
        return out


def _spec(fname: str, name: str, info: Any) -> TensorSpec:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SegmentFileError(f"{fname}: tensor {name!r} entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SegmentFileError(f"{fname}: tensor {name!r} has unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(json_int(d) and 0 <= d < 1 << 31 for d in shape):
        raise SegmentFileError(f"{fname}: tensor {name!r} has an invalid shape {str(shape)[:80]}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(json_int(o) and o >= 0 for o in offs)):
        raise SegmentFileError(f"{fname}: tensor {name!r} has invalid data offsets {str(offs)[:80]}")
    if offs[1] < offs[0]:
        raise SegmentFileError(f"{fname}: tensor {name!r} has invalid data offsets {offs}")
    want = math.prod(shape) * _DTYPES[dtype].itemsize
    if offs[1] - offs[0] != want:
        raise SegmentFileError(
            f"{fname}: tensor {name!r} has {offs[1] - offs[0]} bytes, shape {shape} {dtype} needs {want}"
        )
    return TensorSpec(name, dtype, tuple(shape), offs[0], offs[1])


def _check_tiling(fname: str, specs: list[TensorSpec], data_len: int) -> None:
    """Offsets must tile [0, data_len) exactly: no gap, no overlap, no trailing bytes."""
    at = 0
    for t in sorted(specs, key=lambda t: (t.begin, t.end)):
        if t.begin != at:
            what = "overlaps the previous one" if t.begin < at else f"leaves a gap at byte {at}"
            raise SegmentFileError(f"{fname}: tensor {t.name!r} at bytes [{t.begin}, {t.end}) {what}")
        at = t.end
    if at > data_len:
        raise SegmentFileError(f"{fname} is truncated: its tensors end at byte {at}, the data has {data_len}")
    if at != data_len:
        raise SegmentFileError(f"{fname}: {data_len - at} trailing bytes after the last tensor")


@contextmanager
def open_safetensors(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Iterator[SafetensorsFile]:
    """Open `path` and check its header; tensors are read on demand."""
    with open_regular(path, follow_symlinks=follow_symlinks) as (fh, size):
        yield SafetensorsFile(fh, size, describe(path))


def read_safetensors(
    path: str | os.PathLike[str], max_bytes: int | None = None, *, follow_symlinks: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor and the metadata; refuses more than `max_bytes` of tensor data before reading it."""
    with open_safetensors(path, follow_symlinks=follow_symlinks) as f:
        if max_bytes is not None and f.data_bytes > max_bytes:
            raise SegmentFileError(f"{f.name} holds {f.data_bytes} bytes of tensors, over the limit of {max_bytes}")
        return {k: f.read(k) for k in f.tensors}, f.metadata
