"""Sessions on disk: saved after every turn and edit, reopened as they were.

Layout, one folder per session under the data folder::

    <data>/sessions/<session id>/session.json          transcript, tokens, positions,
                                                        per-layer rows, operations log
    <data>/sessions/<session id>/cache-<sha12>.safetensors   the K/V rows

Decision: the cache tensors are *stored*, not recomputed on reopen. An edited
cache (masked, spliced from another chat, overwritten, compressed) is not a
function of its tokens, so recomputing would silently change what the
person built; storing costs `bytes_per_token` per row (8 KB for the demo
model) and reopening is a file read instead of an O(L^2) prefill.

Crash safety: the tensor file gets a new content-addressed name, is written
to a temporary file, fsynced and renamed; only then is session.json
replaced the same way; old tensor files are deleted last. A kill at any
moment leaves either the previous or the new state, both complete.

Knows nothing about Qt; reads and writes only its own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.errors import SegmentFileError
from kvscope.engine.events import SessionId
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.segment_file import json_int, read_safetensors
from kvscope.engine.session import Session, TurnStats
from kvscope.engine.tensor_ops import to_numpy

FORMAT = "kvscope-session"
VERSION = 1


def default_data_dir() -> Path:
    """`KVSCOPE_HOME`, else the platform's user data folder."""
    env = os.environ.get("KVSCOPE_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "kvscope"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "kvscope"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _cache_bytes(s: Session) -> tuple[bytes, str]:
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    for i, c in enumerate(s.caches):
        if c.n_rows == 0:
            continue
        k, v = c.state
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = to_numpy(k), to_numpy(v)
    data = save(arrays) if arrays else save({"empty": np.zeros(0, np.float32)})
    return data, hashlib.sha256(data).hexdigest()


class SessionStore:
    """Saves and reopens sessions in `root/sessions`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_data_dir()) / "sessions"

    def folder(self, sid: SessionId) -> Path:
        return self.root / sid

    def save(self, s: Session, fingerprint: str, model_name: str) -> Path:
        """Write the session atomically; returns its folder."""
        folder = self.folder(s.id)
        folder.mkdir(parents=True, exist_ok=True)
        data, sha = _cache_bytes(s)
        cache_name = f"cache-{sha[:12]}.safetensors"
        if not (folder / cache_name).exists():
            _atomic_write(folder / cache_name, data)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "model_fingerprint": fingerprint,
            "model_name": model_name,
            "id": s.id,
            "name": s.name,
            "messages": s.messages,
            "tokens": s.tokens,
            "origin": s.origin,
            "positions": s.positions,
            "transcript_text": s.transcript_text,
            "edited": s.edited,
            "operations": s.operations,
            "turns": [t.__dict__ for t in s.turns],
            "cache_file": cache_name,
            "cache_sha256": sha,
            "layers": [
                {
                    "offset": c.offset,
                    "next_token": c.n_tokens,
                    "row_token": c.row_token.tolist(),
                    "row_position": c.row_position.tolist(),
                    "row_visible": c.row_visible.astype(int).tolist(),
                }
                for c in s.caches
            ],
        }
        _atomic_write(folder / "session.json", json.dumps(doc, default=_jsonable).encode())
        for old in folder.glob("cache-*.safetensors"):
            if old.name != cache_name:
                old.unlink(missing_ok=True)
        return folder

    def delete(self, sid: SessionId) -> None:
        shutil.rmtree(self.folder(sid), ignore_errors=True)

    def list(self) -> list[dict[str, Any]]:
        """Summaries of the saved sessions (broken ones carry an `error`)."""
        out = []
        for f in sorted(self.root.glob("*/session.json")) if self.root.exists() else []:
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
                out.append(
                    {
                        "id": doc["id"],
                        "name": doc["name"],
                        "model": doc["model_name"],
                        "fingerprint": doc["model_fingerprint"],
                        "tokens": len(doc["tokens"]),
                    }
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                out.append({"id": f.parent.name, "error": f"{type(exc).__name__}: {exc}"})
        return out

    def load(self, sid: str, fingerprint: str) -> Session:
        """Reopen one session; `SegmentFileError` names what is wrong."""
        return load_session_folder(self.root / sid, fingerprint)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def load_session_folder(folder: Path, fingerprint: str) -> Session:
    name = folder.name
    try:
        doc = json.loads((folder / "session.json").read_bytes().decode("utf-8"))
    except OSError as exc:
        raise SegmentFileError(f"session {name}: cannot read session.json ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegmentFileError(f"session {name}: session.json is corrupt ({exc})") from exc
    _check_doc(name, doc, fingerprint)
    cache_file = folder / doc["cache_file"]
    try:
        if hashlib.sha256(cache_file.read_bytes()).hexdigest() != doc["cache_sha256"]:
            raise SegmentFileError(f"session {name}: cache file checksum mismatch (modified or corrupted)")
    except OSError as exc:
        raise SegmentFileError(f"session {name}: cannot read {cache_file.name} ({exc.strerror or exc})") from exc
    arrays, _ = read_safetensors(cache_file)
    positions = np.asarray(doc["positions"], np.int64)
    layers = [_layer(name, i, lay, arrays, positions) for i, lay in enumerate(doc["layers"])]
    s = Session(SessionId(doc["id"]), doc["name"], layers)
    s.messages, s.tokens, s.origin = doc["messages"], doc["tokens"], doc["origin"]
    s.transcript_text, s.edited, s.operations = doc["transcript_text"], doc["edited"], doc["operations"]
    s.turns = [_turn(name, i, t) for i, t in enumerate(doc["turns"])]
    return s


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


def _check_doc(name: str, doc: Any, fingerprint: str) -> None:
    if not isinstance(doc, dict):
        raise SegmentFileError(f"session {name}: session.json is not a JSON object")
    for key, typ in _DOC_FIELDS.items():
        if key not in doc:
            raise SegmentFileError(f"session {name}: session.json is missing {key!r}")
        if not isinstance(doc[key], typ):
            raise SegmentFileError(f"session {name}: field {key!r} has the wrong type ({type(doc[key]).__name__})")
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        raise SegmentFileError(f"session {name}: format {doc['format']!r} v{doc['version']} is not {FORMAT} v{VERSION}")
    if doc["model_fingerprint"] != fingerprint:
        raise SegmentFileError(f"session {name} belongs to model {doc['model_name']!r}, not the loaded one")
    n = len(doc["tokens"])
    if len(doc["origin"]) != n or len(doc["positions"]) != n or not all(json_int(t) for t in doc["tokens"]):
        raise SegmentFileError(f"session {name}: tokens, origin and positions disagree")
    if "/" in doc["cache_file"] or not doc["cache_file"].startswith("cache-"):
        raise SegmentFileError(f"session {name}: invalid cache file name {doc['cache_file']!r}")
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in doc["messages"]
    ):
        raise SegmentFileError(f"session {name}: messages must be role/content objects")
    if not all(isinstance(t, dict) for t in doc["turns"]):
        raise SegmentFileError(f"session {name}: turns must be objects")


def _turn(name: str, i: int, fields: dict[str, Any]) -> TurnStats:
    try:
        return TurnStats(**fields)
    except TypeError as exc:  # a missing or unknown field
        raise SegmentFileError(f"session {name}: turn {i} is corrupt ({exc})") from exc


def _layer(name: str, i: int, lay: Any, arrays: dict[str, np.ndarray], positions: np.ndarray) -> ScopeKVCache:
    try:
        rows = [np.asarray(lay[k], np.int64) for k in ("row_token", "row_position", "row_visible")]
        offset, n_tokens = int(lay["offset"]), int(lay["next_token"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SegmentFileError(f"session {name}: layer {i} bookkeeping is corrupt ({exc})") from exc
    n = len(rows[0])
    if any(len(r) != n for r in rows) or any(r.ndim != 1 for r in rows):
        raise SegmentFileError(f"session {name}: layer {i} row lists disagree")
    if n_tokens != len(positions):
        raise SegmentFileError(f"session {name}: layer {i} has {n_tokens} tokens, the session {len(positions)}")
    k: np.ndarray | None
    v: np.ndarray | None
    if n == 0:
        k = v = np.zeros((1, 1, 0, 1), np.float32)
    else:
        k, v = arrays.get(f"{i}.keys"), arrays.get(f"{i}.values")
        if k is None or v is None or k.ndim != 4 or k.shape[2] != n or v.shape[:3] != k.shape[:3]:
            raise SegmentFileError(f"session {name}: layer {i} tensors do not match its {n} rows")
    try:
        c = ScopeKVCache.from_rows(mx.array(k), mx.array(v), rows[0], rows[2].astype(bool), positions)
    except ValueError as exc:
        raise SegmentFileError(f"session {name}: layer {i} rows are inconsistent ({exc})") from exc
    if not np.array_equal(c.row_position, rows[1]) or c.offset != offset:
        raise SegmentFileError(f"session {name}: layer {i} positions disagree with the session's")
    return c
