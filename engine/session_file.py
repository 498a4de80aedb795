"""Reading one saved session (a folder with session.json + a cache file), checked to the last field.

Promises:
- `session.json` is read through `bounded_io` (regular file, no symlink,
  size and depth limits, no huge integers or NaN) and every field is type-
  and range-checked before a `Session` is built: the id matches the id
  pattern (and the folder's name, for the store), token ids lie inside the
  loaded model's vocabulary, positions in [0, MAX_POSITION), one layer
  record per model layer whose rows point at existing tokens in order;
- the cache file's size is bounded by what the layers declare *before* it
  is read, its sha256 is checked, it is parsed from the same open file
  (`safetensors_reader`), its tensors are finite and shaped
  `[1, kv_heads, rows, head_dim]` for the loaded model;
- `reserve(n_bytes)` (the engine's memory budget) is asked before any
  tensor is read.

Knows nothing about the store's folders, locks or the engine.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.blocks import TokenState
from kvscope.engine.bounded_io import MAX_JSON_BYTES, check_fields, loads_json, open_regular, read_regular
from kvscope.engine.caches import session_kinds as kinds
from kvscope.engine.errors import SegmentFileError
from kvscope.engine.events import SessionId
from kvscope.engine.head_states import head_rows
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_limits import MAX_POSITION, ModelLimits
from kvscope.engine.safetensors_reader import MAX_HEADER, SafetensorsFile, json_int
from kvscope.engine.session import Session, TurnStats

FORMAT = "kvscope-session"
VERSION = 1
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CACHE_FILE = re.compile(r"cache-[0-9a-f]{12}\.safetensors")
_ORIGINS = {int(s) for s in TokenState}
# one layer's rows: tokens, positions, visibility, and which head holds which row (None: every head)
LayerRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]
_DOC_FIELDS: dict[str, type] = {
    "format": str,
    "version": int,
    "model_fingerprint": str,
    "model_name": str,
    "id": str,
    "name": str,
    "messages": list,
    "tokens": list,
    "origin": list,
    "positions": list,
    "transcript_text": str,
    "edited": bool,
    "operations": list,
    "turns": list,
    "cache_file": str,
    "cache_sha256": str,
    "layers": list,
}


def check_doc(name: str, doc: Any) -> dict[str, Any]:
    """Structure and types of a session.json (no model needed); returns it."""
    if not isinstance(doc, dict):
        raise SegmentFileError(f"session {name}: session.json is not a JSON object")
    check_fields(doc, _DOC_FIELDS, f"session {name}: session.json")
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        raise SegmentFileError(
            f"session {name}: format {doc['format'][:40]!r} v{doc['version']} is not {FORMAT} v{VERSION}"
        )
    if not SESSION_ID.fullmatch(doc["id"]):
        raise SegmentFileError(f"session {name}: id {doc['id'][:80]!r} is not a session id (letters, digits, - and _)")
    if not CACHE_FILE.fullmatch(doc["cache_file"]) or not re.fullmatch(r"[0-9a-f]{64}", doc["cache_sha256"]):
        raise SegmentFileError(f"session {name}: invalid cache file name or checksum {doc['cache_file'][:80]!r}")
    if not all(
        isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
        for m in doc["messages"]
    ):
        raise SegmentFileError(f"session {name}: messages must be role/content objects of text")
    if not all(isinstance(op, dict) for op in doc["operations"]):
        raise SegmentFileError(f"session {name}: operations must be objects")
    return doc


def _check_tokens(name: str, doc: dict[str, Any], lim: ModelLimits) -> None:
    n = len(doc["tokens"])
    if len(doc["origin"]) != n or len(doc["positions"]) != n or n >= MAX_POSITION:
        raise SegmentFileError(f"session {name}: tokens, origin and positions disagree")
    bad = lim.bad_token(doc["tokens"])
    if bad >= 0:
        raise SegmentFileError(
            f"session {name}: token id {str(doc['tokens'][bad])[:30]} is outside the model's vocabulary of "
            f"{lim.vocab_size}"
        )
    if lim.bad_position(doc["positions"]) >= 0:
        raise SegmentFileError(f"session {name}: positions must be integers in [0, {MAX_POSITION})")
    if not all(json_int(o) and o in _ORIGINS for o in doc["origin"]):
        raise SegmentFileError(f"session {name}: origin values must be token states {sorted(_ORIGINS)}")


def _turn(name: str, i: int, rec: Any) -> TurnStats:
    spec = {f.name: f.type for f in fields(TurnStats)}
    if not isinstance(rec, dict) or not {"prompt_tokens", "cached_tokens", "prefilled_tokens"} <= set(rec) <= set(spec):
        raise SegmentFileError(f"session {name}: turn {i} is corrupt (missing or unknown fields)")
    for key, value in rec.items():
        kind = str(spec[key])
        ok = (
            (json_int(value) and 0 <= value < 1 << 53)
            if kind == "int"
            else (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            if kind == "float"
            else isinstance(value, str)
            if kind == "str"
            else isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
        )
        if not ok:
            raise SegmentFileError(f"session {name}: turn {i} is corrupt ({key} = {str(value)[:40]})")
    return TurnStats(**rec)


def _rows(name: str, i: int, lay: Any, n_tokens: int) -> tuple[LayerRows, int, int]:
    keys = {"offset", "next_token", "row_token", "row_position", "row_visible"}
    if not isinstance(lay, dict) or set(lay) - {"head_rows"} != keys:
        raise SegmentFileError(f"session {name}: layer {i} record must have exactly {sorted(keys)} (+ head_rows)")
    lists = [lay[k] for k in ("row_token", "row_position", "row_visible")]
    if not all(isinstance(v, list) and all(json_int(x) and 0 <= x < MAX_POSITION for x in v) for v in lists):
        raise SegmentFileError(f"session {name}: layer {i} rows must be lists of integers in [0, {MAX_POSITION})")
    tok, pos, vis = (np.asarray(v, np.int64) if v else np.zeros(0, np.int64) for v in lists)
    n = len(tok)
    if len(pos) != n or len(vis) != n or n > n_tokens:
        raise SegmentFileError(f"session {name}: layer {i} row lists disagree")
    if n and (tok[0] < 0 or tok[-1] >= n_tokens or (np.diff(tok) <= 0).any()):
        raise SegmentFileError(f"session {name}: layer {i} rows must point at tokens in order")
    if n and (pos.min() < 0 or pos.max() >= MAX_POSITION or not np.isin(vis, (0, 1)).all()):
        raise SegmentFileError(f"session {name}: layer {i} row positions or visibility out of range")
    offset, next_token = lay["offset"], lay["next_token"]
    if not (json_int(offset) and 0 <= offset <= MAX_POSITION and json_int(next_token) and next_token == n_tokens):
        raise SegmentFileError(f"session {name}: layer {i} offset/next_token out of range")
    return (tok, pos, vis, head_rows(name, i, lay.get("head_rows"), n)), offset, next_token


def _cache(
    name: str,
    folder: Path,
    doc: dict[str, Any],
    rows: list[int],
    lim: ModelLimits,
    reserve: Callable[[int], None] | None,
    records: list[dict[str, Any]],
) -> dict[str, np.ndarray]:
    """The cache tensors, size-bounded by the rows declared, checksummed, parsed from one open file."""
    shapes = kinds.expected_tensors(rows, records, lim.cache_dims, (lim.n_kv_heads, lim.head_dim))
    limit = 8 + MAX_HEADER + 4 * sum(math.prod(s) for s in shapes.values())
    path = folder / doc["cache_file"]
    with open_regular(path, follow_symlinks=False) as (fh, size):
        if size > limit:
            raise SegmentFileError(f"session {name}: {path.name} is {size} bytes, more than its rows can take")
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        if h.hexdigest() != doc["cache_sha256"]:
            raise SegmentFileError(f"session {name}: cache file checksum mismatch (modified or corrupted)")
        fh.seek(0)
        f = SafetensorsFile(fh, size, path.name)
        want = set(shapes)
        if set(f.tensors) - {"empty"} != want:
            raise SegmentFileError(f"session {name}: the cache file's tensors do not match the layers' rows")
        if reserve is not None:
            reserve(f.data_bytes)
        out = {}
        for key in sorted(want):
            t = f.tensors[key]
            if t.shape != shapes[key] or t.dtype not in ("F32", "F16", "BF16"):
                raise SegmentFileError(f"session {name}: tensor {key} is {list(t.shape)} {t.dtype}, not {shapes[key]}")
            out[key] = f.read(key)
        return out


def _layer(
    name: str, i: int, rows: tuple[LayerRows, int, int], arrays: dict[str, np.ndarray], positions: np.ndarray
) -> ScopeKVCache:
    """One layer's cache from its checked rows; the cache itself owns positions (and re-checks them)."""
    (tok, pos, vis, heads), offset, _ = rows
    empty = np.zeros((1, 1, 0, 1), np.float32)
    k, v = (arrays[f"{i}.keys"], arrays[f"{i}.values"]) if len(tok) else (empty, empty)
    try:
        c = ScopeKVCache.from_rows(mx.array(k), mx.array(v), tok, vis.astype(bool), positions, heads)
    except ValueError as exc:
        raise SegmentFileError(f"session {name}: layer {i} rows are inconsistent ({exc})") from exc
    if not np.array_equal(c.row_position, pos) or c.offset != offset:
        raise SegmentFileError(f"session {name}: layer {i} positions disagree with the session's")
    return c


def read_session(
    folder: Path,
    lim: ModelLimits,
    expect_id: str | None = None,
    reserve: Callable[[int], None] | None = None,
    label: str | None = None,
) -> Session:
    """Reopen the session saved in `folder` for the model `lim` describes (`label` names it in errors)."""
    name = label or expect_id or folder.name
    raw = read_regular(folder / "session.json", MAX_JSON_BYTES, follow_symlinks=False)
    doc = check_doc(name, loads_json(raw, f"session {name}: session.json"))
    if expect_id is not None and doc["id"] != expect_id:
        raise SegmentFileError(f"session {name}: session.json says its id is {doc['id']!r}, not its folder's name")
    if doc["model_fingerprint"] != lim.fingerprint:
        raise SegmentFileError(f"session {name} belongs to model {doc['model_name'][:80]!r}, not the loaded one")
    _check_tokens(name, doc, lim)
    n = len(doc["tokens"])
    if len(doc["layers"]) != lim.n_layers:
        raise SegmentFileError(f"session {name}: {len(doc['layers'])} layer records, the model has {lim.n_layers}")
    layers = [_rows(name, i, lay, n) for i, lay in enumerate(doc["layers"])]
    turns = [_turn(name, i, t) for i, t in enumerate(doc["turns"])]
    records = kinds.records_of(name, doc, lim)  # the kind of every cache (sliding, recurrent...), checked
    arrays = _cache(name, folder, doc, [len(r[0]) for r, _, _ in layers], lim, reserve, records)
    positions = np.asarray(doc["positions"], np.int64)
    caches = [_layer(name, i, rows, arrays, positions) for i, rows in enumerate(layers)]
    caches = kinds.rebuild_for(name, caches, records, arrays, lim, n)
    s = Session(SessionId(doc["id"]), doc["name"], caches)
    s.messages, s.tokens, s.origin = doc["messages"], doc["tokens"], doc["origin"]
    s.transcript_text, s.edited, s.operations = doc["transcript_text"], doc["edited"], doc["operations"]
    s.turns = turns
    return s
