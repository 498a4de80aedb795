"""The engine's session files: saved after every change, reopened with the model, exported and imported.

Promises:
- with persistence on, `save` writes a session atomically (see
  `persistence`); without it, or while another process owns the data folder,
  it does nothing; a model whose caches cannot be saved (the support table
  says so, and `kvscope info` says why) is not saved either;
- `restore` reopens the saved sessions of the loaded model: a session that
  fails to load is reported in `load_errors`, left on disk untouched, and
  the others still open; each is counted against the memory budget before
  its tensors are read;
- one process writes a data folder: the first engine to restore takes its
  lock; another one opens the sessions read-only and says so in
  `load_errors`;
- export / import go through `.kvsession` archives (`archive`), checked
  exactly like a saved session.

Knows nothing about the registry or events: the Engine registers what this
returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container
from pathlib import Path

from kvscope.engine.archive import read_archive, write_archive
from kvscope.engine.errors import InvalidRequestError, KVScopeError
from kvscope.engine.events import SessionId
from kvscope.engine.model_limits import limits_of
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.persistence import SessionStore
from kvscope.engine.session import Session

Reserve = Callable[[int, str], None]  # MemoryBudget.reserve: bytes, what


class SavedSessions:
    def __init__(self, store: SessionStore | None) -> None:
        self._store = store
        self.load_errors: list[str] = []

    @property
    def folder(self) -> Path | None:
        """The folder holding one sub-folder per saved session (None without persistence)."""
        return self._store.root if self._store else None

    @property
    def data_dir(self) -> Path | None:
        return self._store.data_dir if self._store else None

    def close(self) -> None:
        """Let go of the data folder (its lock) and stop saving: another process may write it now."""
        if self._store is not None:
            self._store.close()
        self._store = None

    def taken(self, sid: SessionId) -> bool:
        """Whether a saved session (of any model) already uses `sid` on disk."""
        return self._store is not None and self._store.folder(sid).exists()

    def save(self, s: Session, lm: LoadedModel) -> None:
        """Save one session now (see the module docstring for when this does nothing)."""
        store = self._store
        if store is None or not store.writable:
            return
        if lm.support is not None and not lm.support.allows("persistence"):
            return
        try:
            store.save(s, lm.fingerprint, lm.name)
        except OSError as exc:
            raise InvalidRequestError(f"could not save session {s.id} to {store.root}: {exc.strerror or exc}") from exc

    def forget(self, sid: SessionId) -> None:
        """Delete a session's saved copy (closing a session deletes it; export first to keep it)."""
        if self._store is not None and self._store.writable:
            self._store.delete(sid, missing_ok=True)

    def restore(self, lm: LoadedModel, open_ids: Container[str], reserve: Reserve) -> list[Session]:
        """The saved sessions of `lm` not already open; problems go to `load_errors`."""
        self.load_errors = []
        store = self._store
        if store is None:
            return []
        notice = store.acquire()
        if notice is not None:
            self.load_errors.append(notice)
        limits = limits_of(lm)
        opened = []
        for entry in store.list():
            if "error" in entry:
                self.load_errors.append(f"session {entry['id']}: {entry['error']}")
                continue
            if entry["fingerprint"] != lm.fingerprint or entry["id"] in open_ids:
                continue
            try:
                opened.append(store.load(entry["id"], limits, _reserving(reserve, f"reopening session {entry['id']}")))
            except KVScopeError as exc:
                self.load_errors.append(f"{exc} (left on disk untouched)")
        return opened

    @staticmethod
    def export(s: Session, lm: LoadedModel, path: str | os.PathLike[str]) -> Path:
        """Write a session (transcript, operations, cache) as one `.kvsession` zip file."""
        lm.require("persistence")  # caches.support: refused before anything is written
        return write_archive(s, lm.fingerprint, lm.name, path)

    @staticmethod
    def read_export(path: str | os.PathLike[str], lm: LoadedModel, free: int, reserve: Reserve) -> Session:
        """A session read from a `.kvsession` file (the caller gives it an id and registers it)."""
        what = f"importing {Path(os.fsdecode(path)).name}"
        lm.require("persistence")
        return read_archive(path, limits_of(lm), free, lambda n: reserve(n, what))


def _reserving(reserve: Reserve, what: str) -> Callable[[int], None]:
    """`reserve` with its `what` filled in (a closure per session, not per loop variable)."""
    return lambda n: reserve(n, what)
