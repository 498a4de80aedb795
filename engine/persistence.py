"""Sessions on disk: saved after every turn and edit, reopened as they were.

Layout, one folder per session under the data folder::

    <data>/kvscope.lock                                   held by the one process that writes here
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
moment leaves either the previous or the new state, both complete; a
failed write removes its temporary file, and the next writer removes any a
kill left behind.

Ids are data, never paths: a session id matches `SESSION_ID`, its folder is
`<data>/sessions/<id>` and nothing else; deleting refuses any id that is
not one session folder there. One process writes a data folder at a time
(`fcntl.flock` on `kvscope.lock`, released by the OS when the process
dies); a second process gets the folder read-only and is told so.

Knows nothing about Qt; reads and writes only its own folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from kvscope.engine.atomic_io import atomic_write
from kvscope.engine.bounded_io import MAX_JSON_BYTES, loads_json, read_regular
from kvscope.engine.caches import session_kinds
from kvscope.engine.errors import InvalidRequestError, KVScopeError
from kvscope.engine.events import SessionId
from kvscope.engine.model_limits import ModelLimits
from kvscope.engine.session import Session
from kvscope.engine.session_file import FORMAT, SESSION_ID, VERSION, check_doc, read_session
from kvscope.engine.tensor_ops import to_numpy

LOCK_NAME = "kvscope.lock"


def default_data_dir() -> Path:
    """`KVSCOPE_HOME`, else the platform's user data folder."""
    env = os.environ.get("KVSCOPE_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "kvscope"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "kvscope"


def check_session_id(sid: object) -> SessionId:
    """`sid` as a `SessionId`, or `InvalidRequestError` if it is not one (e.g. a path)."""
    if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
        raise InvalidRequestError(
            f"{str(sid)[:80]!r} is not a session id: ids are letters, digits, '-' and '_' (like s1), never paths"
        )
    return SessionId(sid)


def _cache_bytes(s: Session) -> tuple[bytes, str]:
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    for i, c in enumerate(s.caches):
        if c.n_rows == 0:
            continue
        k, v = c.state[:2]
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = to_numpy(k), to_numpy(v)
    arrays.update(session_kinds.state_tensors(s.caches))  # recurrent states (refuses caches it cannot save)
    data = save(arrays) if arrays else save({"empty": np.zeros(0, np.float32)})
    return data, hashlib.sha256(data).hexdigest()


def session_doc(s: Session, fingerprint: str, model_name: str, cache_name: str, sha: str) -> dict[str, Any]:
    return {
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
        "operations": _finite(s.operations),
        "turns": [t.__dict__ for t in s.turns],
        "cache_file": cache_name,
        "cache_sha256": sha,
        "cache_kinds": session_kinds.cache_records(s.caches),
        "layers": [
            {
                "offset": c.offset,
                "next_token": c.n_tokens,
                "row_token": c.row_token.tolist(),
                "row_position": c.row_position.tolist(),
                "row_visible": c.row_visible.astype(int).tolist(),
                **({"head_rows": c.head_presence().astype(int).tolist()} if getattr(c, "is_headwise", False) else {}),
            }
            for c in s.caches
        ],
    }


def write_session_folder(folder: Path, s: Session, fingerprint: str, model_name: str) -> None:
    """Write `s` into `folder` atomically (used by the store and by exports)."""
    folder.mkdir(parents=True, exist_ok=True)
    data, sha = _cache_bytes(s)
    cache_name = f"cache-{sha[:12]}.safetensors"
    if not (folder / cache_name).exists():
        atomic_write(folder / cache_name, data)
    doc = session_doc(s, fingerprint, model_name, cache_name, sha)
    atomic_write(folder / "session.json", json.dumps(doc, default=_jsonable, allow_nan=False).encode())
    for old in folder.glob("cache-*.safetensors"):
        if old.name != cache_name:
            old.unlink(missing_ok=True)


class SessionStore:
    """Saves and reopens sessions in `root/sessions`; writes only while it holds the folder's lock."""

    def __init__(self, root: Path | None = None) -> None:
        self.data_dir = root or default_data_dir()
        self.root = self.data_dir / "sessions"
        self._lock: IO[bytes] | None = None

    # ------------------------------------------------------------ the lock
    def acquire(self) -> str | None:
        """Take the data folder for this process. None when taken; else why not (shown to the person)."""
        if self._lock is not None:
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.data_dir / LOCK_NAME, "a+b")  # noqa: SIM115 - held for the store's lifetime
        except OSError as exc:
            return f"the data folder {self.data_dir} cannot be written ({exc.strerror or exc}): sessions are read-only"
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read(32).decode("ascii", "replace").strip() or "?"
            fh.close()
            return (
                f"the data folder {self.data_dir} is in use by another kvscope process (pid {holder}): "
                "its sessions open read-only here and changes in this window are not saved"
            )
        fh.truncate(0)
        fh.write(str(os.getpid()).encode())
        fh.flush()
        self._lock = fh
        self.remove_temp_files()
        return None

    @property
    def writable(self) -> bool:
        return self._lock is not None

    def close(self) -> None:
        """Release the data folder (the OS also releases it when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _require_lock(self, what: str) -> None:
        if self._lock is None:
            reason = self.acquire()
            if reason is not None:
                raise InvalidRequestError(f"cannot {what}: {reason}")

    def remove_temp_files(self) -> list[Path]:
        """Delete temporary files that a failed or killed save left behind (only while holding the lock)."""
        gone: list[Path] = []
        if self._lock is None or not self.root.is_dir():
            return gone
        for folder in self.root.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                for tmp in folder.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                        gone.append(tmp)
        return gone

    # ------------------------------------------------------------ sessions
    def folder(self, sid: str) -> Path:
        return self.root / check_session_id(sid)

    def save(self, s: Session, fingerprint: str, model_name: str) -> Path:
        """Write the session atomically; returns its folder."""
        self._require_lock(f"save session {s.id}")
        folder = self.folder(s.id)
        write_session_folder(folder, s, fingerprint, model_name)
        return folder

    def delete(self, sid: str, missing_ok: bool = False) -> bool:
        """Delete one saved session's folder. Refuses ids that are not one session folder in the store."""
        folder = self.folder(sid)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise InvalidRequestError(f"{folder} is not a session folder: nothing deleted")
        if not folder.is_dir():
            if missing_ok:
                return False
            raise InvalidRequestError(f"no saved session {sid!r} in {self.root}")
        self._require_lock(f"delete session {sid}")
        shutil.rmtree(folder)
        return True

    def list(self) -> list[dict[str, Any]]:
        """Summaries of the saved sessions (broken ones carry an `error`)."""
        out = []
        folders = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for folder in folders:
            if folder.name.startswith(".") or not (folder / "session.json").exists():
                continue
            try:
                if not SESSION_ID.fullmatch(folder.name) or folder.is_symlink():
                    raise InvalidRequestError(f"{folder.name!r} is not a session folder")
                doc = check_doc(
                    folder.name,
                    loads_json(
                        read_regular(folder / "session.json", MAX_JSON_BYTES, follow_symlinks=False),
                        f"session {folder.name}: session.json",
                    ),
                )
                if doc["id"] != folder.name:
                    raise InvalidRequestError(f"session.json says its id is {doc['id']!r}, not its folder's name")
                out.append(
                    {
                        "id": doc["id"],
                        "name": doc["name"],
                        "model": doc["model_name"],
                        "fingerprint": doc["model_fingerprint"],
                        "tokens": len(doc["tokens"]),
                    }
                )
            except KVScopeError as exc:
                out.append({"id": folder.name, "error": str(exc)})
        return out

    def load(self, sid: str, limits: ModelLimits, reserve: Callable[[int], None] | None = None) -> Session:
        """Reopen one session; `SegmentFileError` names what is wrong."""
        folder = self.folder(sid)
        if folder.is_symlink():
            raise InvalidRequestError(f"{folder} is a symbolic link, not a session folder")
        return read_session(folder, limits, expect_id=sid, reserve=reserve)


def _finite(v: Any) -> Any:
    """NaN/inf (a skipped fidelity measure) become null: saved JSON holds finite numbers only."""
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
