"""The Engine's care for the person's work: persistence and the memory budget.

- With persistence on, every completed turn and operation saves the session
  (atomically, see `persistence`); loading a model reopens the sessions saved
  for it; a session that fails to load is reported, left on disk untouched,
  and the others still open.
- The memory budget caps cache bytes for the whole engine (sessions + prefix
  store). Before work that grows the cache, unreferenced prefix blocks are
  evicted (LRU); if that is not enough the work is refused with a message
  that says how much is needed and what to do — never an allocation crash.

Mixed into `Engine`.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvscope.engine.errors import InvalidRequestError, MemoryBudgetError, SegmentFileError
from kvscope.engine.events import EventBus, SessionId
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.persistence import SessionStore, load_session_folder
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.session import Session

_MB = 1024 * 1024


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class LifecycleMixin:
    bus: EventBus
    model: LoadedModel
    store: PrefixStore | None
    persistence: SessionStore | None
    memory_budget_bytes: int
    load_errors: list[str]
    _sessions: dict[SessionId, Session]
    new_session_id: Callable[[], SessionId]
    _guard: Callable[..., Any]
    session: Callable[[SessionId], Session]
    _register: Callable[[Session], None]

    # ------------------------------------------------------------ memory
    def cache_bytes(self) -> int:
        """Bytes of all session caches plus the prefix store."""
        return sum(s.nbytes for s in self._sessions.values()) + (self.store.nbytes if self.store else 0)

    def ensure_budget(self, extra_tokens: int, what: str) -> None:
        """Make room for `extra_tokens` more rows, or refuse `what` clearly."""
        need = extra_tokens * self.model.bytes_per_token
        if self.cache_bytes() + need <= self.memory_budget_bytes:
            return
        if self.store is not None:
            target = max(0, self.memory_budget_bytes - need - sum(s.nbytes for s in self._sessions.values()))
            self.store.evict_to_budget(target)
        used = self.cache_bytes()
        if used + need > self.memory_budget_bytes:
            raise MemoryBudgetError(
                f"{what} needs {need / _MB:.1f} MB of cache but only "
                f"{max(0, self.memory_budget_bytes - used) / _MB:.1f} MB of the {self.memory_budget_bytes / _MB:.0f} MB "
                "budget is free: close or compress a session, or raise the budget (--memory-budget)"
            )

    # ------------------------------------------------------------ persistence
    def persist(self, sid: SessionId) -> None:
        """Save one session now (no-op without persistence)."""
        if self.persistence is None or sid not in self._sessions:
            return
        lm = self.model
        if lm.support is not None and not lm.support.allows("persistence"):
            return  # `kvscope info` says why: this model's caches are not saved
        try:
            self.persistence.save(self._sessions[sid], lm.fingerprint, lm.name)
        except OSError as exc:
            raise InvalidRequestError(
                f"could not save session {sid} to {self.persistence.root}: {exc.strerror or exc}"
            ) from exc

    def forget_saved(self, sid: SessionId) -> None:
        if self.persistence is not None:
            self.persistence.delete(sid)

    def restore_sessions(self) -> list[SessionId]:
        """Reopen the saved sessions of the loaded model; problems go to `load_errors`."""
        self.load_errors = []
        if self.persistence is None:
            return []
        opened = []
        for entry in self.persistence.list():
            if "error" in entry:
                self.load_errors.append(f"session {entry['id']}: {entry['error']}")
                continue
            if entry["fingerprint"] != self.model.fingerprint or entry["id"] in self._sessions:
                continue
            try:
                s = self.persistence.load(entry["id"], self.model.fingerprint)
            except SegmentFileError as exc:
                self.load_errors.append(str(exc))
                continue
            self._register(s)
            opened.append(s.id)
        return opened

    def export_session(self, sid: SessionId, path: str | os.PathLike[str]) -> Path:
        """Write a session (transcript, operations, cache) as one `.kvsession` zip file."""
        s = self.session(sid)
        out = Path(path)

        def run() -> Path:
            with tempfile.TemporaryDirectory() as tmp:
                folder = SessionStore(Path(tmp)).save(s, self.model.fingerprint, self.model.name)
                tmp_zip = out.with_name(out.name + ".tmp")
                try:
                    with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                        for f in folder.iterdir():
                            zf.write(f, f.name)
                    os.replace(tmp_zip, out)
                except OSError as exc:
                    tmp_zip.unlink(missing_ok=True)
                    raise InvalidRequestError(f"cannot write {out}: {exc.strerror or exc}") from exc
            return out

        result: Path = self._guard(sid, run)
        return result

    def import_session(self, path: str | os.PathLike[str], name: str | None = None) -> SessionId:
        """Open a `.kvsession` file as a new session (checked like a saved one)."""

        def run() -> SessionId:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    with zipfile.ZipFile(path) as zf:
                        names = zf.namelist()
                        if "session.json" not in names or any(not re.fullmatch(r"[\w.-]+", n) for n in names):
                            raise SegmentFileError(f"{Path(path).name} is not a kvscope session file")
                        zf.extractall(tmp)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise SegmentFileError(f"{Path(path).name} is not a readable session file: {exc}") from exc
                s = load_session_folder(Path(tmp), self.model.fingerprint)
            s.id = self.new_session_id()
            s.name = name or s.name
            self._register(s)
            self.persist(s.id)
            return s.id

        result: SessionId = self._guard(None, run)
        return result
