"""Segment files: a span's K/V rows as safetensors with a checked manifest.

Layout (mlx-lm prompt-cache compatible, so `mlx_lm.models.cache.
load_prompt_cache` opens a kvscope segment as a list of `KVCache`)::

    tensors   "{layer}.0" keys [1, H, n, D] | "{layer}.1" values | "{layer}.2" int32 n
    metadata  "0.kvscope" manifest JSON | "1.{layer}" "KVCache" | "2.*" mlx-lm scalar table

The manifest holds format + version, model fingerprint, layers, KV heads,
head dim, dtype, RoPE parameters, positions, token ids, text and the sha256
of the tensors. `read_segment` parses the file with its own strict reader
(never pickle, never trusting offsets) and names the first thing that is
wrong; nothing is applied to a session until the whole file checks out.

Knows nothing about sessions; returns `Segment`s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.errors import SegmentFileError
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.surgery import Segment
from kvscope.engine.tensor_ops import to_numpy

FORMAT = "kvscope-segment"
VERSION = 1
MAX_HEADER = 64 * 1024 * 1024
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "model_fingerprint": str,
    "model_name": str,
    "n_layers": int,
    "n_kv_heads": int,
    "head_dim": int,
    "dtype": str,
    "rope": dict,
    "positions": list,
    "token_ids": list,
    "text": str,
    "tensors_sha256": str,
}


def _tensor_hash(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def manifest_for(lm: LoadedModel, seg: Segment, sha: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_fingerprint": lm.fingerprint,
        "model_name": lm.name,
        "n_layers": lm.n_layers,
        "n_kv_heads": lm.n_kv_heads,
        "head_dim": lm.head_dim,
        "value_dim": lm.value_dim,  # differs from head_dim on MLA caches (latent keys, k_pe values)
        "layer_dims": [list(d) for d in lm.cache_dims],  # per layer [kv heads, key dim, value dim]
        "dtype": lm.dtype,
        "rope": lm.rope.as_dict() if lm.rope else {},
        "positions": [int(p) for p in seg.positions],
        "token_ids": [int(t) for t in seg.token_ids],
        "text": seg.text,
        "tensors_sha256": sha,
        "visible": [[bool(x) for x in v] for v in seg.visible],
        "source": seg.source,
    }


def write_segment(lm: LoadedModel, seg: Segment, path: str | os.PathLike[str]) -> Path:
    """Write `seg` atomically (temporary file, fsync, rename)."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    ordered: list[np.ndarray] = []
    meta: dict[str, str] = {"2.0": ""}
    for i, (k, v) in enumerate(zip(seg.keys, seg.values)):
        kn, vn = to_numpy(k, mx.float32), to_numpy(v, mx.float32)
        arrays[f"{i}.0"], arrays[f"{i}.1"] = kn, vn
        arrays[f"{i}.2"] = np.array(seg.n_tokens, np.int32)
        ordered += [kn, vn]
        meta[f"1.{i}"] = "KVCache"
        meta[f"2.{i + 1}.0"], meta[f"2.{i + 1}.1"] = f"{i}.2", "scalar"
    manifest = manifest_for(lm, seg, _tensor_hash(ordered))
    manifest["dtype"] = "float32"
    meta["0.kvscope"] = json.dumps(manifest)
    data = save(arrays, metadata=meta)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SegmentFileError(f"cannot write segment to {path}: {exc.strerror or exc}") from exc
    return path


# ---------------------------------------------------------------- reading
def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Strictly parse a safetensors file into numpy arrays and metadata."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SegmentFileError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if len(raw) < 8:
        raise SegmentFileError(f"{p.name} is truncated: {len(raw)} bytes, not even a header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or n > len(raw) - 8:
        raise SegmentFileError(
            f"{p.name}: header length {n} exceeds the file ({len(raw)} bytes): truncated or not safetensors"
        )
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SegmentFileError(f"{p.name}: header is not UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise SegmentFileError(f"{p.name}: header is not valid JSON ({exc.msg})") from exc
    if not isinstance(header, dict):
        raise SegmentFileError(f"{p.name}: header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SegmentFileError(f"{p.name}: metadata must map strings to strings")
    data = memoryview(raw)[8 + n :]
    return {name: _tensor(p.name, name, info, data) for name, info in header.items()}, meta


def json_int(x: Any) -> bool:
    """True for a JSON integer; `true`/`false` are not (Python counts bool as int)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor(fname: str, name: str, info: Any, data: memoryview) -> np.ndarray:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SegmentFileError(f"{fname}: tensor {name!r} entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SegmentFileError(f"{fname}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(json_int(d) and 0 <= d < 1 << 31 for d in shape):
        raise SegmentFileError(f"{fname}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(json_int(o) for o in offs) and 0 <= offs[0] <= offs[1]):
        raise SegmentFileError(f"{fname}: tensor {name!r} has invalid data offsets {offs!r}")
    if offs[1] > len(data):
        raise SegmentFileError(f"{fname} is truncated: tensor {name!r} ends at byte {offs[1]}, data has {len(data)}")
    want = math.prod(shape) * _DTYPES[dtype].itemsize
    if offs[1] - offs[0] != want:
        raise SegmentFileError(
            f"{fname}: tensor {name!r} has {offs[1] - offs[0]} bytes, shape {shape} {dtype} needs {want}"
        )
    arr = np.frombuffer(data[offs[0] : offs[1]], _DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32) if dtype in ("F16", "BF16") else arr.copy()


def _manifest(fname: str, meta: dict[str, str]) -> dict[str, Any]:
    try:
        man = json.loads(meta["0.kvscope"])
    except json.JSONDecodeError as exc:
        raise SegmentFileError(f"{fname}: the kvscope manifest is not valid JSON ({exc.msg})") from exc
    if not isinstance(man, dict):
        raise SegmentFileError(f"{fname}: the kvscope manifest is not a JSON object")
    for key, typ in _MANIFEST_FIELDS.items():
        if key not in man:
            raise SegmentFileError(f"{fname}: the manifest is missing {key!r}")
        if not isinstance(man[key], typ) or isinstance(man[key], bool):
            raise SegmentFileError(f"{fname}: manifest field {key!r} has the wrong type ({type(man[key]).__name__})")
    if man["format"] != FORMAT:
        raise SegmentFileError(f"{fname}: format is {man['format']!r}, expected {FORMAT!r}")
    if man["version"] != VERSION:
        raise SegmentFileError(
            f"{fname}: format version {man['version']} is not supported (this kvscope reads {VERSION})"
        )
    return man


def inspect_segment(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and verify a kvscope segment file; returns its manifest (no model needed)."""
    arrays, meta = read_safetensors(path)
    return _verified(Path(path).name, arrays, meta)


def _verified(fname: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> dict[str, Any]:
    if "0.kvscope" not in meta:
        if meta.get("1.0") == "KVCache":
            raise SegmentFileError(
                f"{fname} is an mlx-lm prompt cache, not a kvscope segment: import it with its prompt text"
            )
        raise SegmentFileError(f"{fname} has no kvscope manifest: not a kvscope segment file")
    man = _manifest(fname, meta)
    _check_arrays(fname, man, arrays)
    return man


def _check_arrays(fname: str, man: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    n_layers, n = man["n_layers"], len(man["token_ids"])
    if n == 0 or len(man["positions"]) != n:
        raise SegmentFileError(f"{fname}: {n} token ids but {len(man['positions'])} positions")
    if not all(json_int(t) and t >= 0 for t in man["token_ids"]):
        raise SegmentFileError(f"{fname}: token ids must be non-negative integers")
    pos = man["positions"]
    if not all(json_int(q) for q in pos) or any(b <= a for a, b in zip(pos, pos[1:])) or pos[0] < 0:
        raise SegmentFileError(f"{fname}: positions must be increasing non-negative integers")
    expected = {f"{i}.{j}" for i in range(n_layers) for j in range(3)}
    if set(arrays) != expected:
        extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise SegmentFileError(
            f"{fname}: tensors do not match {n_layers} layers (missing {missing[:4]}, unexpected {extra[:4]})"
        )
    default = [man["n_kv_heads"], man["head_dim"], man.get("value_dim", man["head_dim"])]
    dims = man.get("layer_dims") or [default] * n_layers
    if (
        not isinstance(dims, list)
        or len(dims) != n_layers
        or not all(isinstance(d, list) and len(d) == 3 and all(json_int(x) for x in d) for d in dims)
    ):
        raise SegmentFileError(f"{fname}: layer_dims must be {n_layers} [kv heads, key dim, value dim] triples")
    ordered = []
    for i in range(n_layers):
        length = arrays[f"{i}.2"]
        if length.shape != () or int(length) != n:
            raise SegmentFileError(f"{fname}: layer {i} says it caches {length.tolist()} tokens, the manifest has {n}")
        for j in (0, 1):
            a = arrays[f"{i}.{j}"]
            shape = [1, dims[i][0], n, dims[i][1 + j]]
            if list(a.shape) != shape or a.dtype != np.float32:
                raise SegmentFileError(
                    f"{fname}: tensor {i}.{j} is {list(a.shape)} {a.dtype}, manifest says {shape} float32"
                )
            ordered.append(a)
    if _tensor_hash(ordered) != man["tensors_sha256"]:
        raise SegmentFileError(f"{fname}: tensor checksum mismatch: the file was modified or corrupted")
    return ordered


def _check_model(fname: str, man: dict[str, Any], lm: LoadedModel) -> None:
    for key, have in (
        ("n_layers", lm.n_layers),
        ("n_kv_heads", lm.n_kv_heads),
        ("head_dim", lm.head_dim),
        ("value_dim", lm.value_dim),
    ):
        if man.get(key, man["head_dim"]) != have:
            raise SegmentFileError(f"{fname}: {key} is {man[key]}, the loaded model has {have}")
    if "layer_dims" in man and lm.cache_dims and man["layer_dims"] != [list(d) for d in lm.cache_dims]:
        raise SegmentFileError(f"{fname}: layer shapes {man['layer_dims']} differ from the model's {lm.cache_dims}")
    if lm.rope and man["rope"] != lm.rope.as_dict():
        raise SegmentFileError(f"{fname}: RoPE {man['rope']} differs from the model's {lm.rope.as_dict()}")
    if man["model_fingerprint"] != lm.fingerprint:
        raise SegmentFileError(
            f"{fname} was made with model {man['model_name']!r} (fingerprint {man['model_fingerprint']}); "
            f"the loaded model is {lm.name!r} ({lm.fingerprint})"
        )


def read_segment(path: str | os.PathLike[str], lm: LoadedModel) -> Segment:
    """Load and verify a segment for `lm`; raises `SegmentFileError` naming the problem."""
    arrays, meta = read_safetensors(path)
    fname = Path(path).name
    man = _verified(fname, arrays, meta)
    _check_model(fname, man, lm)
    n_layers = man["n_layers"]
    visible = man.get("visible")
    n = len(man["token_ids"])
    if not (
        isinstance(visible, list)
        and len(visible) == n_layers
        and all(isinstance(v, list) and len(v) == n for v in visible)
    ):
        visible = [[True] * n] * n_layers
    return Segment(
        token_ids=list(man["token_ids"]),
        positions=np.asarray(man["positions"], np.int64),
        keys=[mx.array(arrays[f"{i}.0"]) for i in range(n_layers)],
        values=[mx.array(arrays[f"{i}.1"]) for i in range(n_layers)],
        visible=[np.asarray(v, bool) for v in visible],
        text=man["text"],
        source=str(path),
    )


def read_mlx_prompt_cache(path: str | os.PathLike[str], lm: LoadedModel, prompt: str) -> Segment:
    """Import a file written by `mlx_lm.cache_prompt` as a segment.

    mlx-lm's files record no token ids, so the prompt text it was made from
    is required; it is tokenized as `cache_prompt` does and must give exactly
    the cached number of tokens.
    """
    arrays, meta = read_safetensors(path)
    fname = Path(path).name
    classes = [meta.get(f"1.{i}") for i in range(lm.n_layers)]
    if any(c != "KVCache" for c in classes) or f"1.{lm.n_layers}" in meta:
        raise SegmentFileError(
            f"{fname}: not an mlx-lm KVCache prompt cache with {lm.n_layers} layers (classes {classes[:4]}...)"
        )
    offsets = {int(arrays[f"{i}.2"]) for i in range(lm.n_layers) if f"{i}.2" in arrays}
    if len(offsets) != 1:
        raise SegmentFileError(f"{fname}: layers disagree on the cached length ({sorted(offsets)})")
    n = offsets.pop()
    tok = lm.tokenizer
    if getattr(tok, "has_chat_template", False):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=False, continue_final_message=True
        )
    else:
        ids = tok.encode(prompt)
    ids = [int(t) for t in (ids["input_ids"] if isinstance(ids, dict) else ids)]
    if len(ids) != n:
        raise SegmentFileError(
            f"{fname} caches {n} tokens but the given prompt has {len(ids)}: pass the exact prompt it was made from"
        )
    keys, values = [], []
    for i in range(lm.n_layers):
        k, v = arrays.get(f"{i}.0"), arrays.get(f"{i}.1")
        for name, a in ((f"{i}.0", k), (f"{i}.1", v)):
            if a is None or a.ndim != 4 or a.shape[1] != lm.n_kv_heads or a.shape[3] != lm.head_dim or a.shape[2] < n:
                got = None if a is None else list(a.shape)
                raise SegmentFileError(
                    f"{fname}: tensor {name} is {got}, expected [1, {lm.n_kv_heads}, >={n}, {lm.head_dim}]"
                )
        keys.append(mx.array(k[..., :n, :]))  # type: ignore[index]
        values.append(mx.array(v[..., :n, :]))  # type: ignore[index]
    return Segment(ids, np.arange(n, dtype=np.int64), keys, values, [np.ones(n, bool)] * lm.n_layers, prompt, str(path))
