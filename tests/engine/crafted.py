"""Crafting hostile segment and session files from good ones (shared by the hostile-input tests and the fuzzer).

A crafted segment keeps a *valid* checksum (recomputed the way kvscope
writes it), so what is tested is the range check, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

_SUMS = ("sha256", "tensors_sha256")


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def pack(header: dict[str, Any] | str, body: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


def _kv(header: dict[str, Any], body: bytes) -> list[np.ndarray]:
    """The K/V tensors in the order kvscope hashes them (layer by layer, keys then values)."""
    out = []
    n_layers = sum(1 for k in header if k.endswith(".0"))
    for i in range(n_layers):
        for j in (0, 1):
            a, b = header[f"{i}.{j}"]["data_offsets"]
            out.append(np.frombuffer(body[a:b], "<f4"))
    return out


def resum(header: dict[str, Any], body: bytes, man: dict[str, Any]) -> dict[str, Any]:
    """`man` with a checksum that matches it and the tensors (format 2)."""
    h = hashlib.sha256()
    for a in _kv(header, body):
        h.update(a.tobytes())
    h.update(
        json.dumps({k: v for k, v in man.items() if k not in _SUMS}, sort_keys=True, separators=(",", ":")).encode()
    )
    return dict(man, sha256=h.hexdigest())


def with_manifest(good: bytes, keep_sum: bool = False, raw: str | None = None, **changes: Any) -> bytes:
    """A copy of segment `good` whose manifest has `changes` (checksum recomputed unless `keep_sum`).

    `raw` replaces the manifest text outright (for JSON Python cannot write: depth bombs, huge integers).
    """
    header, body = split(good)
    man = json.loads(header["__metadata__"]["0.kvscope"])
    man.update(changes)
    if not keep_sum:
        man = resum(header, body, man)
    header["__metadata__"]["0.kvscope"] = raw if raw is not None else json.dumps(man)
    return pack(header, body)


def with_tensor(good: bytes, name: str, values: np.ndarray) -> bytes:
    """Replace tensor `name`'s float32 data (same size) and recompute the checksum."""
    header, body = split(good)
    a, b = header[name]["data_offsets"]
    data = np.ascontiguousarray(values, "<f4").tobytes()
    assert len(data) == b - a
    body = body[:a] + data + body[b:]
    man = resum(header, body, json.loads(header["__metadata__"]["0.kvscope"]))
    header["__metadata__"]["0.kvscope"] = json.dumps(man)
    return pack(header, body)
