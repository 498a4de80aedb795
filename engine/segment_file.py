"""Segment files: a span's K/V rows as safetensors with a checked manifest.

Layout (mlx-lm prompt-cache compatible, so `mlx_lm.models.cache.
load_prompt_cache` opens a kvscope segment as a list of `KVCache`)::

    tensors   "{layer}.0" keys [1, H, n, D] | "{layer}.1" values | "{layer}.2" int32 n
    metadata  "0.kvscope" manifest JSON | "1.{layer}" "KVCache" | "2.*" mlx-lm scalar table

The manifest holds format + version, model fingerprint, layers, KV heads,
head dim, dtype, RoPE parameters, positions, token ids, per-layer
visibility, text and a sha256 over the tensors *and* the manifest (format
2; format 1 files, whose checksum covered the tensors only, still read).

Reading goes through `safetensors_reader` (bounded, strict) and checks every
manifest field's type and range — against the loaded model in
`read_segment` (token ids inside the vocabulary, positions below
`MAX_POSITION`, layers, heads, head dim, RoPE) — *before* any tensor byte is
read; nothing reaches a session until the whole file checks out.

Knows nothing about sessions; returns `Segment`s.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine import chat
from kvscope.engine.atomic_io import atomic_write
from kvscope.engine.bounded_io import check_fields, loads_json
from kvscope.engine.errors import InvalidRequestError, SegmentFileError
from kvscope.engine.model_limits import MAX_POSITION, ModelLimits, limits_of
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.safetensors_reader import SafetensorsFile, json_int, open_safetensors
from kvscope.engine.surgery import Segment
from kvscope.engine.tensor_ops import to_numpy

__all__ = ["check_segment", "inspect_segment", "json_int", "read_segment", "write_segment"]

FORMAT = "kvscope-segment"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_LAYERS, MAX_HEADS, MAX_HEAD_DIM = 1024, 1024, 65536
MAX_TOKEN_ID = 1 << 31  # no vocabulary is larger; the loaded model's is checked too
_FIELDS: dict[str, type] = {
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
}
_SUMS = ("sha256", "tensors_sha256")


def _digest(ordered: list[np.ndarray], manifest: dict[str, Any] | None) -> str:
    """sha256 over the K/V tensors, then (format 2) the manifest without its checksum, canonically."""
    h = hashlib.sha256()
    for a in ordered:
        h.update(np.ascontiguousarray(a).tobytes())
    if manifest is not None:
        body = {k: v for k, v in manifest.items() if k not in _SUMS}
        h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def manifest_for(lm: LoadedModel, seg: Segment) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_fingerprint": lm.fingerprint,
        "model_name": lm.name,
        "n_layers": lm.n_layers,
        "n_kv_heads": lm.n_kv_heads,
        "head_dim": lm.head_dim,
        "layer_dims": _layer_dims(lm),  # per layer [kv heads, key dim, value dim]: MLA values differ
        "dtype": "float32",
        "rope": lm.rope.as_dict() if lm.rope else {},
        "positions": [int(p) for p in seg.positions],
        "token_ids": [int(t) for t in seg.token_ids],
        "text": seg.text,
        "visible": [[bool(x) for x in v] for v in seg.visible],
        "source": seg.source,
    }


def _layer_dims(lm: LoadedModel) -> list[list[int]]:
    dims = [list(d) for d in lm.cache_dims] if lm.cache_dims else []
    return dims if len(dims) == lm.n_layers else [[lm.n_kv_heads, lm.head_dim, lm.head_dim]] * lm.n_layers


def _shapes(fname: str, man: dict[str, Any], n: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer, the (keys, values) shape the manifest promises."""
    n_layers = man["n_layers"]
    dims = man.get("layer_dims") or [[man["n_kv_heads"], man["head_dim"], man["head_dim"]]] * n_layers
    if (
        not isinstance(dims, list)
        or len(dims) != n_layers
        or not all(
            isinstance(d, list) and len(d) == 3 and all(isinstance(x, int) and 0 < x <= MAX_HEAD_DIM for x in d)
            for d in dims
        )
    ):
        raise SegmentFileError(f"{fname}: layer_dims must be {n_layers} [kv heads, key dim, value dim] triples")
    return [((1, h, n, k), (1, h, n, v)) for h, k, v in dims]


def _refuse_special_target(path: Path) -> None:
    """Writing replaces the target: refuse a FIFO, device or directory there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise SegmentFileError(f"cannot write a segment to {path!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SegmentFileError(f"cannot write a segment to {path}: it exists and is not a regular file")


def write_segment(lm: LoadedModel, seg: Segment, path: str | os.PathLike[str]) -> Path:
    """Write `seg` atomically (temporary file, fsync, rename)."""
    from safetensors.numpy import save

    path = Path(path)
    _refuse_special_target(path)
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
    manifest = manifest_for(lm, seg)
    manifest["sha256"] = _digest(ordered, manifest)
    meta["0.kvscope"] = json.dumps(manifest)
    data = save(arrays, metadata=meta)
    try:
        atomic_write(path, data)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise SegmentFileError(f"cannot write segment to {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return path


# ---------------------------------------------------------------- checking
def _manifest(f: SafetensorsFile) -> dict[str, Any]:
    meta, fname = f.metadata, f.name
    if "0.kvscope" not in meta:
        if meta.get("1.0") == "KVCache":
            raise SegmentFileError(
                f"{fname} is an mlx-lm prompt cache, not a kvscope segment: import it with its prompt text"
            )
        raise SegmentFileError(f"{fname} has no kvscope manifest: not a kvscope segment file")
    man = loads_json(meta["0.kvscope"], f"{fname}: the kvscope manifest")
    if not isinstance(man, dict):
        raise SegmentFileError(f"{fname}: the kvscope manifest is not a JSON object")
    check_fields(man, _FIELDS, f"{fname}: the manifest")
    if man["format"] != FORMAT:
        raise SegmentFileError(f"{fname}: format is {man['format'][:40]!r}, expected {FORMAT!r}")
    if man["version"] not in READABLE_VERSIONS:
        raise SegmentFileError(
            f"{fname}: format version {man['version']} is not supported (this kvscope reads {READABLE_VERSIONS})"
        )
    sum_key = "sha256" if man["version"] >= 2 else "tensors_sha256"
    if not isinstance(man.get(sum_key), str):
        raise SegmentFileError(f"{fname}: the manifest is missing its checksum {sum_key!r}")
    for key, typ in (("visible", list), ("source", str)):
        if (key in man or man["version"] >= 2 and key == "visible") and not isinstance(man.get(key), typ):
            raise SegmentFileError(f"{fname}: manifest field {key!r} is missing or has the wrong type")
    _check_ranges(fname, man, len(f.tensors))
    return man


def _check_ranges(fname: str, man: dict[str, Any], n_tensors: int) -> None:
    """Every number in range, before anything is built from them (no model needed)."""
    for key, hi in (("n_layers", MAX_LAYERS), ("n_kv_heads", MAX_HEADS), ("head_dim", MAX_HEAD_DIM)):
        if not 1 <= man[key] <= hi:
            raise SegmentFileError(f"{fname}: {key} is {man[key]}, outside [1, {hi}]")
    if man["n_layers"] * 3 != n_tensors:
        raise SegmentFileError(f"{fname}: {n_tensors} tensors do not match {man['n_layers']} layers (3 per layer)")
    if man["dtype"] != "float32":
        raise SegmentFileError(f"{fname}: dtype {man['dtype'][:40]!r} is not the segment format's float32")
    ids, pos = man["token_ids"], man["positions"]
    n = len(ids)
    if n == 0 or len(pos) != n:
        raise SegmentFileError(f"{fname}: {n} token ids but {len(pos)} positions")
    bad = next((t for t in ids if not (json_int(t) and 0 <= t < MAX_TOKEN_ID)), None)
    if bad is not None:
        raise SegmentFileError(f"{fname}: token id {str(bad)[:30]} is not a token id (0 <= id < 2^31)")
    if not all(json_int(q) and 0 <= q < MAX_POSITION for q in pos) or any(b <= a for a, b in zip(pos, pos[1:])):
        raise SegmentFileError(f"{fname}: positions must be increasing integers in [0, {MAX_POSITION})")
    vis = man.get("visible")
    if vis is not None and not (
        len(vis) == man["n_layers"]
        and all(isinstance(v, list) and len(v) == n and all(isinstance(x, bool) for x in v) for v in vis)
    ):
        raise SegmentFileError(f"{fname}: 'visible' must be {man['n_layers']} lists of {n} true/false values")


def _check_model(fname: str, man: dict[str, Any], lim: ModelLimits, rope: dict[str, Any] | None) -> None:
    for key, have in (("n_layers", lim.n_layers), ("n_kv_heads", lim.n_kv_heads), ("head_dim", lim.head_dim)):
        if man[key] != have:
            raise SegmentFileError(f"{fname}: {key} is {man[key]}, the loaded model has {have}")
    if man["model_fingerprint"] != lim.fingerprint:
        raise SegmentFileError(
            f"{fname} was made with model {man['model_name'][:80]!r} (fingerprint {man['model_fingerprint'][:40]}); "
            f"the loaded model is {lim.name!r} ({lim.fingerprint})"
        )
    if rope is not None and man["rope"] != rope:
        raise SegmentFileError(f"{fname}: RoPE {str(man['rope'])[:200]} differs from the model's {rope}")
    bad = lim.bad_token(man["token_ids"])
    if bad >= 0:
        raise SegmentFileError(
            f"{fname}: token id {man['token_ids'][bad]} is outside the model's vocabulary of {lim.vocab_size}"
        )


def _tensors(f: SafetensorsFile, man: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read and check the K/V tensors against the manifest and its checksum."""
    n_layers, n = man["n_layers"], len(man["token_ids"])
    expected = {f"{i}.{j}" for i in range(n_layers) for j in range(3)}
    if set(f.tensors) != expected:
        extra, missing = sorted(set(f.tensors) - expected), sorted(expected - set(f.tensors))
        raise SegmentFileError(
            f"{f.name}: tensors do not match {n_layers} layers (missing {missing[:4]}, unexpected {extra[:4]})"
        )
    shapes = _shapes(f.name, man, n)
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for i in range(n_layers):
        length = f.tensors[f"{i}.2"]
        said = f.read(f"{i}.2").tolist() if length.shape == () and length.dtype in ("I32", "I64") else "no count of"
        if said != n:
            raise SegmentFileError(f"{f.name}: layer {i} says it caches {said} tokens, the manifest has {n}")
        for j, out in ((0, keys), (1, values)):
            t = f.tensors[f"{i}.{j}"]
            shape = shapes[i][j]
            if t.shape != shape or t.dtype != "F32":
                raise SegmentFileError(
                    f"{f.name}: tensor {i}.{j} is {list(t.shape)} {t.dtype}, manifest says {list(shape)} F32"
                )
            out.append(f.read(f"{i}.{j}"))
    ordered = [a for kv in zip(keys, values) for a in kv]
    v2 = man["version"] >= 2
    if _digest(ordered, man if v2 else None) != man["sha256" if v2 else "tensors_sha256"]:
        what = "tensors or manifest" if v2 else "tensors"
        raise SegmentFileError(f"{f.name}: checksum mismatch: the {what} were modified or corrupted")
    return keys, values


def inspect_segment(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and verify a kvscope segment file; returns its manifest (no model needed)."""
    with open_safetensors(path) as f:
        man = _manifest(f)
        _tensors(f, man)
    return man


def read_segment(
    path: str | os.PathLike[str], lm: LoadedModel, reserve: Callable[[int], None] | None = None
) -> Segment:
    """Load and verify a segment for `lm`; raises `SegmentFileError` naming the problem.

    `reserve(n_tokens)` is called once the manifest checks out and before any
    tensor byte is read (the engine's memory budget).
    """
    with open_safetensors(path) as f:
        man = _manifest(f)
        _check_model(f.name, man, limits_of(lm), lm.rope.as_dict() if lm.rope else None)
        if "layer_dims" in man and man["layer_dims"] != _layer_dims(lm):
            raise SegmentFileError(f"{f.name}: layer shapes {str(man['layer_dims'])[:200]} differ from the model's")
        n, n_layers = len(man["token_ids"]), man["n_layers"]
        if reserve is not None:
            reserve(n)
        keys, values = _tensors(f, man)
    visible = man.get("visible") or [[True] * n] * n_layers
    return Segment(
        token_ids=list(man["token_ids"]),
        positions=np.asarray(man["positions"], np.int64),
        keys=[mx.array(k) for k in keys],
        values=[mx.array(v) for v in values],
        visible=[np.asarray(v, bool) for v in visible],
        text=man["text"],
        source=str(path),
    )


def check_segment(seg: Segment, lm: LoadedModel) -> None:
    """Refuse a `Segment` (from a file or the Python API) that does not fit `lm`."""
    lim, n = limits_of(lm), seg.n_tokens
    if n == 0:
        raise InvalidRequestError("the segment is empty")
    ids = [int(t) if isinstance(t, np.integer) else t for t in seg.token_ids]
    bad = lim.bad_token(ids)
    if bad >= 0:
        raise InvalidRequestError(
            f"segment token id {str(ids[bad])[:30]} is outside the model's vocabulary of {lim.vocab_size}"
        )
    pos = np.asarray(seg.positions)
    if pos.shape != (n,) or pos.dtype.kind not in "iu" or lim.bad_position(pos.tolist()) >= 0:
        raise InvalidRequestError(f"segment positions must be {n} integers in [0, {MAX_POSITION})")
    if n > 1 and not (np.diff(pos) > 0).all():
        raise InvalidRequestError("segment positions must be increasing")
    shapes = [((1, h, n, k), (1, h, n, v)) for h, k, v in _layer_dims(lm)]
    if len(seg.keys) != lim.n_layers or len(seg.values) != lim.n_layers or len(seg.visible) != lim.n_layers:
        raise InvalidRequestError(f"the segment has {len(seg.keys)} layers, the model has {lim.n_layers}")
    for i, (k, v, vis) in enumerate(zip(seg.keys, seg.values, seg.visible)):
        if (tuple(k.shape), tuple(v.shape)) != shapes[i] or np.shape(vis) != (n,):
            raise InvalidRequestError(f"segment layer {i} is {list(k.shape)}, the model needs {list(shapes[i][0])}")


def read_mlx_prompt_cache(
    path: str | os.PathLike[str], lm: LoadedModel, prompt: str, reserve: Callable[[int], None] | None = None
) -> Segment:
    """Import a file written by `mlx_lm.cache_prompt` as a segment.

    mlx-lm's files record no token ids, so the prompt text it was made from
    is required; it is tokenized as `cache_prompt` does and must give exactly
    the cached number of tokens.
    """
    with open_safetensors(path) as f:
        return _mlx_prompt_cache(f, lm, prompt, str(path), reserve)


def _mlx_prompt_cache(
    f: SafetensorsFile, lm: LoadedModel, prompt: str, source: str, reserve: Callable[[int], None] | None
) -> Segment:
    fname, meta = f.name, f.metadata
    classes = [meta.get(f"1.{i}") for i in range(lm.n_layers)]
    if any(c != "KVCache" for c in classes) or f"1.{lm.n_layers}" in meta:
        raise SegmentFileError(
            f"{fname}: not an mlx-lm KVCache prompt cache with {lm.n_layers} layers (classes {classes[:4]}...)"
        )
    scalars = [f.tensors.get(f"{i}.2") for i in range(lm.n_layers)]
    if any(t is None or t.shape != () or t.dtype not in ("I32", "I64") for t in scalars):
        raise SegmentFileError(f"{fname}: every layer needs an integer offset tensor '{{layer}}.2'")
    offsets = {int(f.read(f"{i}.2")) for i in range(lm.n_layers)}
    if len(offsets) != 1:
        raise SegmentFileError(f"{fname}: layers disagree on the cached length ({sorted(offsets)[:4]})")
    n = offsets.pop()
    ids = chat.continued_ids(lm.tokenizer, prompt)
    if len(ids) != n or n == 0:
        raise SegmentFileError(
            f"{fname} caches {n} tokens but the given prompt has {len(ids)}: pass the exact prompt it was made from"
        )
    for i in range(lm.n_layers):
        for name in (f"{i}.0", f"{i}.1"):
            t = f.tensors.get(name)
            if t is None or len(t.shape) != 4 or t.shape[:2] != (1, lm.n_kv_heads) or t.shape[3] != lm.head_dim:
                got = None if t is None else list(t.shape)
                raise SegmentFileError(
                    f"{fname}: tensor {name} is {got}, expected [1, {lm.n_kv_heads}, n, {lm.head_dim}]"
                )
            if t.shape[2] < n or t.dtype not in ("F32", "F16", "BF16"):
                raise SegmentFileError(f"{fname}: tensor {name} holds {t.shape[2]} {t.dtype} rows, needs {n} float")
    if reserve is not None:
        reserve(n)
    keys = [mx.array(f.read(f"{i}.0")[..., :n, :]) for i in range(lm.n_layers)]
    values = [mx.array(f.read(f"{i}.1")[..., :n, :]) for i in range(lm.n_layers)]
    return Segment(ids, np.arange(n, dtype=np.int64), keys, values, [np.ones(n, bool)] * lm.n_layers, prompt, source)
