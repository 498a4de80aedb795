"""The one edit transaction every session operation goes through, and the error guard.

    tx.run(sid, "masking", change, undo_label="mask")

Promises:
- `run` refuses while the session generates (`BusyError`), then runs
  `change(session)` and saves the session (`save`); if either fails — an
  error, a cancellation, full memory, a full disk — the session is put back
  exactly as it was (name, cache, bookkeeping, undo stack and operations log) and
  nothing is saved: the error propagates;
- with `undo_label`, the state before the change is pushed on the session's
  undo stack (at most `UNDO_DEPTH` entries) as part of the transaction;
- `guarded` is how every engine call reports an error: `KVScopeError`s are
  emitted as `EngineError` events and re-raised; an allocation failure
  (`MemoryError`, or MLX's "allocation" `RuntimeError`) becomes a
  `MemoryBudgetError` that says what to do.

Knows nothing about models or files: `save` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kvscope.engine.errors import KVScopeError, MemoryBudgetError
from kvscope.engine.events import EngineError, EventBus, SessionId
from kvscope.engine.registry import SessionRegistry
from kvscope.engine.session import Session

T = TypeVar("T")
UNDO_DEPTH = 8


def guarded(bus: EventBus, sid: SessionId | None, fn: Callable[[], T]) -> T:
    """`fn()`, with its errors reported as `EngineError` events (see the module docstring)."""
    try:
        return fn()
    except KVScopeError as exc:
        bus.emit(EngineError(bus.now_ms(), sid, type(exc).__name__, str(exc)))
        raise
    except (MemoryError, RuntimeError) as exc:
        text = str(exc).lower()
        if not isinstance(exc, MemoryError) and "alloc" not in text and "memory" not in text:
            raise
        err = MemoryBudgetError(f"out of memory ({exc}): close or compress a session, or lower --memory-budget")
        bus.emit(EngineError(bus.now_ms(), sid, type(err).__name__, str(err)))
        raise err from exc


class Transactions:
    def __init__(self, bus: EventBus, registry: SessionRegistry, save: Callable[[Session], None]) -> None:
        self._bus = bus
        self._registry = registry
        self._save = save

    def run(self, sid: SessionId, what: str, change: Callable[[Session], T], undo_label: str | None = None) -> T:
        """Apply `change` to session `sid` and save it, all or nothing (see the module docstring)."""
        s = self._registry.get(sid)
        s.require_idle(what)

        def body() -> T:
            saved, undo, n_ops, name = s.clone(), list(s.undo_stack), len(s.operations), s.name
            try:
                result = change(s)
                if undo_label is not None:
                    s.push_undo(undo_label, saved, UNDO_DEPTH)
                self._save(s)
            except BaseException:
                s.restore(saved)
                s.name, s.undo_stack = name, undo
                del s.operations[n_ops:]
                raise
            return result

        return guarded(self._bus, sid, body)

    def guard(self, sid: SessionId | None, fn: Callable[[], T]) -> T:
        return guarded(self._bus, sid, fn)
