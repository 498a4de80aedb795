"""The Engine's care for the person's work: persistence and the memory budget.

- With persistence on, every completed turn and operation saves the session
  (atomically, see `persistence`); loading a model reopens the sessions saved
  for it; a session that fails to load is reported, left on disk untouched,
  and the others still open.
- The memory budget caps cache bytes for the whole engine (sessions + prefix
  store). Before work that grows the cache, unreferenced prefix blocks are
  evicted (LRU); if that is not enough the work is refused with a message
  that says how much is needed and what to do — never an allocation crash.
  Work is counted in real tokens and bytes (text is tokenized first; a
  restored or imported session counts its tensor bytes) before allocating.
- One process writes a data folder: the first engine to restore takes its
  lock; another one opens the sessions read-only and says so in
  `load_errors`.

Mixed into `Engine`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvscope.engine.archive import read_archive, write_archive
from kvscope.engine.errors import InvalidRequestError, KVScopeError, MemoryBudgetError
from kvscope.engine.events import EventBus, SessionId
from kvscope.engine.model_limits import limits_of
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.persistence import SessionStore
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.session import Session


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
    _drop: Callable[[SessionId], None]

    # ------------------------------------------------------------ memory
    def cache_bytes(self) -> int:
        """Bytes of all session caches plus the prefix store."""
        return sum(s.nbytes for s in self._sessions.values()) + (self.store.nbytes if self.store else 0)

    def ensure_budget(self, extra_tokens: int, what: str) -> None:
        """Make room for `extra_tokens` more rows, or refuse `what` clearly."""
        self.ensure_budget_bytes(extra_tokens * self.model.bytes_per_token, what)

    def ensure_budget_bytes(self, need: int, what: str) -> None:
        """Make room for `need` more bytes of cache, or refuse `what` before anything is allocated."""
        if self.cache_bytes() + need <= self.memory_budget_bytes:
            return
        if self.store is not None:
            target = max(0, self.memory_budget_bytes - need - sum(s.nbytes for s in self._sessions.values()))
            self.store.evict_to_budget(target)
        used = self.cache_bytes()
        if used + need > self.memory_budget_bytes:
            raise MemoryBudgetError(
                f"{what} needs {format_bytes(need)} of cache but only "
                f"{format_bytes(max(0, self.memory_budget_bytes - used))} of the "
                f"{format_bytes(self.memory_budget_bytes)} budget is free: "
                "close or compress a session, or raise the budget (--memory-budget)"
            )

    def ensure_budget_for_text(self, text: str, extra_tokens: int, what: str) -> None:
        """Budget check on the real token count of `text` (tokenized first), plus `extra_tokens`."""
        from kvscope.engine import chat

        self.ensure_budget(len(chat.encode(self.model.tokenizer, text)) + extra_tokens, what)

    # ------------------------------------------------------------ persistence
    def persist(self, sid: SessionId) -> None:
        """Save one session now (no-op without persistence, or when another process owns the folder)."""
        store = self.persistence
        if store is None or not store.writable or sid not in self._sessions:
            return
        lm = self.model
        if lm.support is not None and not lm.support.allows("persistence"):
            return  # `kvscope info` says why: this model's caches are not saved
        try:
            store.save(self._sessions[sid], lm.fingerprint, lm.name)
        except OSError as exc:
            raise InvalidRequestError(f"could not save session {sid} to {store.root}: {exc.strerror or exc}") from exc

    def forget_saved(self, sid: SessionId) -> None:
        if self.persistence is not None and self.persistence.writable:
            self.persistence.delete(sid, missing_ok=True)

    def restore_sessions(self) -> list[SessionId]:
        """Reopen the saved sessions of the loaded model; problems go to `load_errors`."""
        self.load_errors = []
        store = self.persistence
        if store is None:
            return []
        notice = store.acquire()
        if notice is not None:
            self.load_errors.append(notice)
        limits = limits_of(self.model)
        opened = []
        for entry in store.list():
            if "error" in entry:
                self.load_errors.append(f"session {entry['id']}: {entry['error']}")
                continue
            if entry["fingerprint"] != self.model.fingerprint or entry["id"] in self._sessions:
                continue
            what = f"reopening session {entry['id']}"
            try:
                s = store.load(entry["id"], limits, lambda n, w=what: self.ensure_budget_bytes(n, w))
            except KVScopeError as exc:
                self.load_errors.append(f"{exc} (left on disk untouched)")
                continue
            self._register(s)
            opened.append(s.id)
        return opened

    def export_session(self, sid: SessionId, path: str | os.PathLike[str]) -> Path:
        """Write a session (transcript, operations, cache) as one `.kvsession` zip file."""
        s = self.session(sid)

        def run() -> Path:
            self.model.require("persistence")  # refused before anything is written
            return write_archive(s, self.model.fingerprint, self.model.name, path)

        result: Path = self._guard(sid, run)
        return result

    def import_session(self, path: str | os.PathLike[str], name: str | None = None) -> SessionId:
        """Open a `.kvsession` file as a new session (checked like a saved one, and against the budget)."""

        def run() -> SessionId:
            self.model.require("persistence")
            free = max(0, self.memory_budget_bytes - self.cache_bytes())
            what = f"importing {Path(os.fsdecode(path)).name}"
            s = read_archive(path, limits_of(self.model), free, lambda n: self.ensure_budget_bytes(n, what))
            s.id = self.new_session_id()
            s.name = name or s.name
            self._register(s)
            try:
                self.persist(s.id)
            except KVScopeError:
                self._drop(s.id)
                raise
            return s.id

        result: SessionId = self._guard(None, run)
        return result


def format_bytes(n: float) -> str:
    """Bytes for a person: 512 B, 12.3 KB, 4.0 MB, 1.50 GB (never a misleading "0 MB")."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(n)} B"
