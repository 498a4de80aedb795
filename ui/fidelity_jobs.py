"""FidelityJobs: fidelity measured after an edit, off the critical path.

An edit's fidelity is a full recompute of the session (seconds on a long
session: 28.7 s against 110 ms for the edit itself on ~4k tokens of the
demo model, bench/gui.py). Past `inline_max_tokens` the window applies the
edit without it (the engine's `fidelity=False`), shows the result at once,
and queues the measurement here.

Promises:
- lower priority than everything else: a queued measurement is sent to
  the engine thread only when no other call is in flight and no snapshot
  is waiting (`EngineBridge.idle()`), one at a time, so the edit's own
  result reaches the screen first and chats and edits of any session
  never wait behind it;
- cancellable: `skip(sid)` drops a session's queued measurement (the
  window calls it for the Skip button, for any newer operation or turn of
  that session — the state would no longer be the edit's — and when the
  session closes); a newer deferred edit replaces the older one;
- results come out as `measured(sid, op, report)` with the same fields as
  an inline report, measured the same way (against a full recompute of
  the visible tokens at their positions).

`_measure` calls `Engine.measure_fidelity` on the engine thread through
the bridge, as the engine's own edits measure.
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from kvscope.engine.events import SessionId
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.dialogs import report_dict

DEFAULT_INLINE_MAX_TOKENS = 1024
POLL_MS = 100


class FidelityJobs(QObject):
    measured = Signal(str, str, object)  # session id, operation, report dict
    queue_changed = Signal(int)  # measurements waiting or running

    def __init__(self, bridge: EngineBridge, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.inline_max_tokens = DEFAULT_INLINE_MAX_TOKENS
        self.pending: dict[str, tuple[str, dict[str, Any]]] = {}  # sid -> (op, report without fidelity)
        self.running: str | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._maybe_start)
        self._timer.start()

    def set_inline_max_tokens(self, n_tokens: int) -> None:
        """Sessions up to this many tokens measure an edit's fidelity inside the edit."""
        self.inline_max_tokens = n_tokens

    def inline(self, n_tokens: int) -> bool:
        """Measure inside the edit (small sessions) or queue it here."""
        return n_tokens <= self.inline_max_tokens

    def queue(self, sid: str, op: str, report: dict[str, Any]) -> None:
        self.pending.pop(sid, None)  # re-insert: the newest request goes last
        self.pending[sid] = (op, report)
        self.queue_changed.emit(self.n_waiting())

    def skip(self, sid: str) -> None:
        if self.pending.pop(sid, None) is not None:
            self.queue_changed.emit(self.n_waiting())

    def n_waiting(self) -> int:
        return len(self.pending) + (self.running is not None)

    def _maybe_start(self) -> None:
        if self.running is not None or not self.pending or not self.bridge.idle():
            return
        sid = next(iter(self.pending))
        op, first = self.pending.pop(sid)
        self.running = sid
        self.bridge.call(
            lambda eng: _measure(eng, SessionId(sid), op, first),
            lambda rep: self._done(sid, op, rep),
            lambda _exc: self._done(sid, op, None),
        )

    def _done(self, sid: str, op: str, report: Any) -> None:
        self.running = None
        self.queue_changed.emit(self.n_waiting())
        if report is not None:
            self.measured.emit(sid, op, report_dict(report))


def _measure(eng: Any, sid: SessionId, op: str, first: dict[str, Any]) -> Any:
    """Measure the session as it is now (engine thread), keeping the edit's own figures."""
    elapsed = first.get("elapsed_ms", 0.0)
    rows = first.get("rows_changed", 0)
    extra = first.get("extra") or {}
    return eng.measure_fidelity(sid, op, 0.0 if math.isnan(elapsed) else elapsed, rows, **extra)
