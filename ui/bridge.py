"""EngineBridge: the one QObject between the window and the engine thread.

Promises:
- owns the `EngineWorker`; every engine call goes through `call(fn)` and runs
  on the engine thread; the Qt thread never touches mx;
- a call's result or exception comes back as a queued signal
  (`call_done(ticket, result)` / `call_failed(ticket, kind, message)`) and to
  optional per-call callbacks, always on the Qt thread; nothing is swallowed;
- engine events are batched on the engine thread and delivered on the Qt
  thread as `events(list)` — at most one wake-up is queued at a time, so a
  1000 tok/s decode cannot flood the Qt event loop;
- snapshots are coalesced: `want_snapshot(sid)` only marks the session dirty;
  a ~30 Hz timer submits one job for all dirty sessions, with at most one
  snapshot job in flight (a job queued behind a long chat is that one job).

Knows nothing about widgets.
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from kvscope.engine.engine import Engine, EngineConfig
from kvscope.engine.events import Event, SessionId
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.engine.worker import EngineWorker

OnDone = Callable[[Any], None]
OnError = Callable[[BaseException], None]
SNAPSHOT_INTERVAL_MS = 33


class EngineBridge(QObject):
    call_done = Signal(int, object)  # ticket, result
    call_failed = Signal(int, str, str)  # ticket, error kind, message
    events = Signal(list)  # batch of engine events, in order
    snapshot_ready = Signal(object)  # SessionSnapshot
    busy_changed = Signal(bool)  # any call in flight
    _wake = Signal()
    _finished = Signal(int, object, object)  # ticket, result, exception

    def __init__(self, config: EngineConfig | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker = EngineWorker(config)
        self._tickets = itertools.count(1)
        self._callbacks: dict[int, tuple[OnDone | None, OnError | None]] = {}
        self._lock = threading.Lock()
        self._pending_events: list[Event] = []
        self._wake_queued = False
        self._dirty: set[SessionId] = set()
        self._snapshot_in_flight = False
        self.snapshots_taken = 0
        self._wake.connect(self._drain_events)
        self._finished.connect(self._on_finished)
        self._unsubscribe = self.worker.engine.subscribe(self._on_engine_event)
        self._timer = QTimer(self)
        self._timer.setInterval(SNAPSHOT_INTERVAL_MS)
        self._timer.timeout.connect(self._on_tick)
        self._timer.start()

    # ------------------------------------------------------------ calls
    def call(self, fn: Callable[[Engine], Any], on_done: OnDone | None = None, on_error: OnError | None = None) -> int:
        """Run `fn(engine)` on the engine thread; returns a ticket for the signals."""
        ticket = next(self._tickets)
        self._callbacks[ticket] = (on_done, on_error)
        if len(self._callbacks) == 1:
            self.busy_changed.emit(True)
        fut = self.worker.submit(fn)
        fut.add_done_callback(partial(self._emit_finished, ticket))
        return ticket

    def in_flight(self) -> int:
        return len(self._callbacks)

    def idle(self) -> bool:
        """No call in flight and no snapshot waiting to be taken: low-priority work may start."""
        return not self._callbacks and not self._dirty

    def cancel(self, sid: SessionId) -> None:
        """Stop a generation at its next step (safe from the Qt thread)."""
        self.worker.cancel(sid)

    def shutdown(self) -> None:
        self._timer.stop()
        self._unsubscribe()
        self.worker.shutdown()

    def _emit_finished(self, ticket: int, fut: Future[Any]) -> None:
        # Runs on the engine thread: hand over by a queued signal.
        exc = fut.exception()
        self._finished.emit(ticket, None if exc else fut.result(), exc)

    @Slot(int, object, object)
    def _on_finished(self, ticket: int, result: Any, exc: BaseException | None) -> None:
        on_done, on_error = self._callbacks.pop(ticket, (None, None))
        if exc is None:
            self.call_done.emit(ticket, result)
            if on_done is not None:
                on_done(result)
        else:
            if not _is_user_error(exc):
                traceback.print_exception(exc)
            self.call_failed.emit(ticket, type(exc).__name__, str(exc))
            if on_error is not None:
                on_error(exc)
        if not self._callbacks:
            self.busy_changed.emit(False)

    # ------------------------------------------------------------ events
    def _on_engine_event(self, event: Event) -> None:
        # Engine thread: append, and queue one wake-up if none is pending.
        with self._lock:
            self._pending_events.append(event)
            if self._wake_queued:
                return
            self._wake_queued = True
        self._wake.emit()

    @Slot()
    def _drain_events(self) -> None:
        with self._lock:
            batch, self._pending_events = self._pending_events, []
            self._wake_queued = False
        if batch:
            self.events.emit(batch)

    # ------------------------------------------------------------ snapshots
    def want_snapshot(self, sid: SessionId) -> None:
        """Mark a session as changed; its snapshot arrives on the next tick."""
        self._dirty.add(sid)

    @Slot()
    def _on_tick(self) -> None:
        if self._snapshot_in_flight or not self._dirty:
            return
        sids, self._dirty = sorted(self._dirty), set()
        self._snapshot_in_flight = True
        self.call(lambda eng: _snapshots(eng, sids), self._on_snapshots, self._on_snapshot_error)

    def _on_snapshots(self, snaps: list[SessionSnapshot]) -> None:
        self._snapshot_in_flight = False
        self.snapshots_taken += len(snaps)
        for snap in snaps:
            self.snapshot_ready.emit(snap)

    def _on_snapshot_error(self, exc: BaseException) -> None:
        self._snapshot_in_flight = False


def _snapshots(eng: Engine, sids: list[SessionId]) -> list[SessionSnapshot]:
    """Snapshots of the sessions that still exist (one may close meanwhile)."""
    alive = set(eng.sessions())
    return [eng.snapshot(s) for s in sids if s in alive]


def _is_user_error(exc: BaseException) -> bool:
    from kvscope.engine.errors import KVScopeError

    return isinstance(exc, KVScopeError)
