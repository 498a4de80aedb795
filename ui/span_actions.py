"""SpanActions: what a person can do to a selected span of one session.

Each action of `actions.EDIT_ACTIONS` is a `QAction` (in the view's context
menu, with the table's label and shortcut) that asks for its parameters in a
dialog, then calls a method taking them as arguments (`mask()`,
`compact(summary)`, `compress(policy, ...)`) — tests and scripts call those
methods directly. Every call goes through the bridge; its report goes out
as `report_ready(op, report)` (the window shows it in its docked report
panel) and is kept in `last_report`; errors go out as `failed(op, message)`,
never swallowed. `started(op)` says a person's action is about to run (the
view makes itself the active one); `submitted(op)` says an operation was
queued for the engine thread (the window tells the person when it waits
behind another session's generation).

Knows its view only as a `SpanSource` (its selection and token count) and a
parent widget for dialogs: no import of the view, so no import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from PySide6.QtCore import QMimeData, QObject, QPoint, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QFileDialog, QInputDialog, QMenu, QWidget

from kvscope.engine.engine import Engine
from kvscope.engine.events import SessionId
from kvscope.engine.splicing import SpliceOptions
from kvscope.ui.actions import EDIT_ACTIONS, context_text, enabled, fill_menu
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.dialogs import CompactDialog, CompressDialog, report_dict
from kvscope.ui.drag_format import DragFormatError, decode_segment, segment_files


class SpanSource(Protocol):
    """What SpanActions reads from the view it acts for (SessionView provides it)."""

    @property
    def generating(self) -> bool: ...

    def selection(self) -> tuple[int, int]: ...

    def token_count(self) -> int: ...


class SpanActions(QObject):
    report_ready = Signal(str, object)  # operation, report dict
    failed = Signal(str, str)  # operation, message
    started = Signal(str)  # operation: a person's action is about to run
    submitted = Signal(str)  # operation
    measure_later = Signal(str, object)  # operation, report without fidelity: measure it off the critical path

    def __init__(self, bridge: EngineBridge, sid: SessionId, source: SpanSource, parent: QWidget) -> None:
        super().__init__(parent)
        self.bridge, self.sid = bridge, sid
        self._source = source
        self._widget = parent  # dialogs and the context menu open over it
        self.last_report: dict[str, Any] | None = None
        self.last_error: str | None = None
        # Measure fidelity inside the edit (True) or after it (False); the window sets the policy.
        self._inline_fidelity: Callable[[], bool] = lambda: True
        slots: dict[str, Callable[[], object]] = {
            "mask": self.mask,
            "unmask": self.unmask,
            "compact": self._ask_compact,
            "erratum": self._ask_erratum,
            "delete": self.delete,
            "compress": self._ask_compress,
            "save": self._ask_save,
            "undo": self.undo,
        }
        self.actions: dict[str, QAction] = {}
        for action in EDIT_ACTIONS:
            # The key is only shown here: the window's Edit actions own the keys
            # and route them to the active session (focus may be anywhere in it).
            act = QAction(context_text(action), self)
            act.triggered.connect(lambda _=False, s=slots[action.key]: s())
            self.actions[action.key] = act

    def set_inline_fidelity(self, policy: Callable[[], bool]) -> None:
        """Whether an edit measures its fidelity inline (True) or leaves it to `measure_later`."""
        self._inline_fidelity = policy

    def record_report(self, report: dict[str, Any]) -> None:
        """Keep a report measured after the edit as this session's last one."""
        self.last_report = report

    def trigger(self, key: str) -> None:
        """Run the action `key` (a key of `actions.ACTIONS`) as if chosen from the menu."""
        self.actions[key].trigger()

    # ------------------------------------------------------------ menu
    def show_menu(self, global_pos: QPoint) -> None:
        menu = self.build_menu()
        menu.exec(global_pos)

    def build_menu(self) -> QMenu:
        """The context menu: every edit action, in table order, enabled by the table's rule."""
        menu = QMenu(self._widget)
        span, busy = self._source.selection(), self._source.generating
        for action in EDIT_ACTIONS:
            self.actions[action.key].setEnabled(enabled(action, span, busy))
        fill_menu(menu, self.actions)
        return menu

    # ------------------------------------------------------------ operations
    def run(
        self,
        op: str,
        fn: Callable[[Engine], Any],
        on_done: Callable[[Any], None] | None = None,
        deferred: bool = False,
    ) -> int:
        """Run one engine operation for this session and show its report.

        `deferred`: the edit ran without measuring fidelity; `measure_later` asks for it.
        """
        self.started.emit(op)

        def done(result: Any) -> None:
            self.last_report = report_dict(result)
            self.last_error = None
            if deferred:  # first: the report then says "measuring…"
                self.measure_later.emit(op, self.last_report)
            self.report_ready.emit(op, self.last_report)
            self.bridge.want_snapshot(self.sid)
            if on_done is not None:
                on_done(result)

        def failed(exc: BaseException) -> None:
            self.last_error = str(exc)
            self.failed.emit(op, str(exc))
            self.bridge.want_snapshot(self.sid)

        ticket = self.bridge.call(fn, done, failed)
        self.submitted.emit(op)
        return ticket

    def _span(self) -> tuple[int, int] | None:
        lo, hi = self._source.selection()
        return (lo, hi) if hi > lo else None

    def _measured(self, op: str, fn: Callable[[Engine, bool], Any]) -> int:
        """Run an edit that can measure its fidelity inline or leave it for later."""
        inline = self._inline_fidelity()
        return self.run(op, lambda e: fn(e, inline), deferred=not inline)

    def mask(self) -> int | None:
        sid, span = self.sid, self._span()
        return span and self._measured("mask", lambda e, f: e.mask(sid, *span, fidelity=f))

    def unmask(self) -> int | None:
        sid, span = self.sid, self._span()
        return span and self._measured("unmask", lambda e, f: e.unmask(sid, *span, fidelity=f))

    def compact(self, summary: str | None) -> int | None:
        sid, span = self.sid, self._span()
        return span and self._measured("compact", lambda e, f: e.compact(sid, *span, summary=summary, fidelity=f))

    def erratum(self, text: str) -> int:
        sid = self.sid
        return self._measured("erratum", lambda e, f: e.erratum(sid, text, fidelity=f))

    def delete(self, shift: bool = True) -> int | None:
        sid, span = self.sid, self._span()
        return span and self._measured("delete", lambda e, f: e.delete_span(sid, *span, shift=shift, fidelity=f))

    def compress(self, policy: str, keep_ratio: float | None = None, budget_tokens: int | None = None) -> int:
        sid = self.sid
        # The engine's compress reports its decision, not its fidelity: always measure it after.
        return self.run(
            "compress",
            lambda e: e.compress(sid, policy, keep_ratio=keep_ratio, budget_tokens=budget_tokens),
            deferred=True,
        )

    def save(self, path: str | Path) -> int | None:
        sid, span = self.sid, self._span()
        return span and self.run("save", lambda e: {"path": str(e.save_segment(sid, *span, Path(path)))})

    def undo(self) -> int:
        sid = self.sid
        return self.run("undo", lambda e: {"undone": e.undo(sid)})

    def splice(self, src: SessionId, lo: int, hi: int, at: int | None, seam_repair: int = 0) -> int:
        dst = self.sid
        return self._measured(
            "splice", lambda e, f: e.splice(dst, src, lo, hi, SpliceOptions(at=at, seam_repair=seam_repair, fidelity=f))
        )

    def splice_file(self, path: str | Path, at: int | None, seam_repair: int = 0) -> int:
        dst = self.sid
        return self._measured(
            "splice",
            lambda e, f: e.splice_file(dst, Path(path), SpliceOptions(at=at, seam_repair=seam_repair, fidelity=f)),
        )

    # ------------------------------------------------------------ drops
    def handle_drop(self, mime: QMimeData, at: int) -> int | None:
        """A segment or file dropped at token `at` (end of the cache = append)."""
        where = None if at >= self._source.token_count() else at
        try:
            seg = decode_segment(mime)
        except DragFormatError as exc:  # the views refuse these before: a direct call can still pass one
            self.failed.emit("splice", str(exc))
            return None
        if seg is not None:
            return self.splice(SessionId(seg.session), seg.lo, seg.hi, where)
        files = segment_files(mime)
        return self.splice_file(files[0], where) if files else None

    # ------------------------------------------------------------ dialogs
    def _ask_compact(self) -> None:
        dlg = CompactDialog(self._widget)
        if dlg.exec():
            self.compact(dlg.summary())

    def _ask_erratum(self) -> None:
        text, ok = QInputDialog.getText(self._widget, "Erratum", "Correction (e.g. [update] field -> new value):")
        if ok and text.strip():
            self.erratum(text)

    def _ask_compress(self) -> None:
        dlg = CompressDialog(self._widget)
        if dlg.exec():
            self.compress(dlg.policy(), dlg.keep_ratio(), dlg.budget_tokens())

    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self._widget, "Save segment", "segment.safetensors", "Segments (*.safetensors)"
        )
        if path:
            self.save(path)
