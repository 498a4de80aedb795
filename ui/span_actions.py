"""SpanActions: what a person can do to a selected span of one session.

Each action is a `QAction` with a shortcut (also in the strip's context
menu) that asks for its parameters in a dialog, then calls a method taking
them as arguments (`mask()`, `compact(summary)`, `compress(policy, ...)`) —
tests and scripts call those methods directly. Every call goes through the
bridge; its report goes out as `report_ready(op, report)` (the window shows
it in its docked report panel) and is kept in `last_report`; errors go out
as `failed(op, message)`, never swallowed. `submitted(op)` says an
operation was queued for the engine thread (the window tells the person
when it waits behind another session's generation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QMimeData, QObject, QPoint, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QInputDialog, QMenu

from kvscope.engine.engine import Engine
from kvscope.engine.splicing import SpliceOptions
from kvscope.ui.dialogs import CompactDialog, CompressDialog, report_dict
from kvscope.ui.drops import MIME_SEGMENT

if TYPE_CHECKING:
    from kvscope.ui.session_view import SessionView

SHORTCUTS = {
    "mask": "M",
    "unmask": "Shift+M",
    "compact": "C",
    "erratum": "E",
    "delete": "Delete",
    "compress": "P",
    "save": "Ctrl+Shift+S",
    "undo": "Ctrl+Z",
}


class SpanActions(QObject):
    report_ready = Signal(str, object)  # operation, report dict
    failed = Signal(str, str)  # operation, message
    submitted = Signal(str)  # operation
    measure_later = Signal(str, object)  # operation, report without fidelity: measure it off the critical path

    def __init__(self, view: SessionView) -> None:
        super().__init__(view)
        self.view = view
        self.last_report: dict[str, Any] | None = None
        self.last_error: str | None = None
        # Measure fidelity inside the edit (True) or after it (False); the window sets the policy.
        self.inline_fidelity: Callable[[SessionView], bool] = lambda _view: True
        self.actions: dict[str, QAction] = {}
        labels = {
            "mask": ("Mask span", self.mask),
            "unmask": ("Unmask span", self.unmask),
            "compact": ("Compact with summary…", self._ask_compact),
            "erratum": ("Append erratum…", self._ask_erratum),
            "delete": ("Delete span", self.delete),
            "compress": ("Compress with policy…", self._ask_compress),
            "save": ("Save span as segment…", self._ask_save),
            "undo": ("Undo", self.undo),
        }
        for key, (label, slot) in labels.items():
            # The key is only shown here: the window's Edit actions own the keys
            # and route them to the active session (focus may be anywhere in it).
            shown = QKeySequence(SHORTCUTS[key]).toString(QKeySequence.SequenceFormat.NativeText)
            act = QAction(f"{label}\t{shown}", view)
            act.triggered.connect(lambda _=False, s=slot: s())
            self.actions[key] = act

    def trigger(self, key: str) -> None:
        """Run the action `key` (a key of SHORTCUTS) as if chosen from the menu."""
        self.actions[key].trigger()

    # ------------------------------------------------------------ menu
    def show_menu(self, global_pos: QPoint) -> None:
        menu = self.build_menu()
        menu.exec(global_pos)

    def build_menu(self) -> QMenu:
        menu = QMenu(self.view)
        lo, hi = self.view.selection()
        has_span = hi > lo
        for key in ("mask", "unmask", "compact", "delete", "compress", "save"):
            self.actions[key].setEnabled(has_span or key == "compress")
            menu.addAction(self.actions[key])
        menu.addSeparator()
        menu.addAction(self.actions["erratum"])
        menu.addAction(self.actions["undo"])
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
        self.view.activated.emit(self.view.sid)

        def done(result: Any) -> None:
            self.last_report = report_dict(result)
            self.last_error = None
            if deferred:  # first: the report then says "measuring…"
                self.measure_later.emit(op, self.last_report)
            self.report_ready.emit(op, self.last_report)
            self.view.bridge.want_snapshot(self.view.sid)
            if on_done is not None:
                on_done(result)

        def failed(exc: BaseException) -> None:
            self.last_error = str(exc)
            self.failed.emit(op, str(exc))
            self.view.bridge.want_snapshot(self.view.sid)

        ticket = self.view.bridge.call(fn, done, failed)
        self.submitted.emit(op)
        return ticket

    def _span(self) -> tuple[int, int] | None:
        lo, hi = self.view.selection()
        return (lo, hi) if hi > lo else None

    def _measured(self, op: str, fn: Callable[[Engine, bool], Any]) -> int:
        """Run an edit that can measure its fidelity inline or leave it for later."""
        inline = self.inline_fidelity(self.view)
        return self.run(op, lambda e: fn(e, inline), deferred=not inline)

    def mask(self) -> int | None:
        sid, span = self.view.sid, self._span()
        return span and self._measured("mask", lambda e, f: e.mask(sid, *span, fidelity=f))

    def unmask(self) -> int | None:
        sid, span = self.view.sid, self._span()
        return span and self._measured("unmask", lambda e, f: e.unmask(sid, *span, fidelity=f))

    def compact(self, summary: str | None) -> int | None:
        sid, span = self.view.sid, self._span()
        return span and self._measured("compact", lambda e, f: e.compact(sid, *span, summary=summary, fidelity=f))

    def erratum(self, text: str) -> int:
        sid = self.view.sid
        return self._measured("erratum", lambda e, f: e.erratum(sid, text, fidelity=f))

    def delete(self, shift: bool = True) -> int | None:
        sid, span = self.view.sid, self._span()
        return span and self._measured("delete", lambda e, f: e.delete_span(sid, *span, shift=shift, fidelity=f))

    def compress(self, policy: str, keep_ratio: float | None = None, budget_tokens: int | None = None) -> int:
        sid = self.view.sid
        # The engine's compress reports its decision, not its fidelity: always measure it after.
        return self.run(
            "compress",
            lambda e: e.compress(sid, policy, keep_ratio=keep_ratio, budget_tokens=budget_tokens),
            deferred=True,
        )

    def save(self, path: str | Path) -> int | None:
        sid, span = self.view.sid, self._span()
        return span and self.run("save", lambda e: {"path": str(e.save_segment(sid, *span, Path(path)))})

    def undo(self) -> int:
        sid = self.view.sid
        return self.run("undo", lambda e: {"undone": e.undo(sid)})

    def splice(self, src: str, lo: int, hi: int, at: int | None, seam_repair: int = 0) -> int:
        dst = self.view.sid
        return self._measured(
            "splice", lambda e, f: e.splice(dst, src, lo, hi, SpliceOptions(at=at, seam_repair=seam_repair, fidelity=f))
        )

    def splice_file(self, path: str | Path, at: int | None, seam_repair: int = 0) -> int:
        dst = self.view.sid
        return self._measured(
            "splice",
            lambda e, f: e.splice_file(dst, Path(path), SpliceOptions(at=at, seam_repair=seam_repair, fidelity=f)),
        )

    # ------------------------------------------------------------ drops
    def handle_drop(self, mime: QMimeData, at: int) -> int | None:
        """A segment or file dropped at token `at` (end of the cache = append)."""
        n = len(self.view.strip.texts)
        where = None if at >= n else at
        if mime.hasFormat(MIME_SEGMENT):
            seg = json.loads(bytes(mime.data(MIME_SEGMENT)).decode())
            return self.splice(seg["session"], int(seg["lo"]), int(seg["hi"]), where)
        for url in mime.urls():
            if url.toLocalFile().endswith(".safetensors"):
                return self.splice_file(url.toLocalFile(), where)
        return None

    # ------------------------------------------------------------ dialogs
    def _ask_compact(self) -> None:
        dlg = CompactDialog(self.view)
        if dlg.exec():
            self.compact(dlg.summary())

    def _ask_erratum(self) -> None:
        text, ok = QInputDialog.getText(self.view, "Erratum", "Correction (e.g. [update] field -> new value):")
        if ok and text.strip():
            self.erratum(text)

    def _ask_compress(self) -> None:
        dlg = CompressDialog(self.view)
        if dlg.exec():
            self.compress(dlg.policy(), dlg.keep_ratio(), dlg.budget_tokens())

    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self.view, "Save segment", "segment.safetensors", "Segments (*.safetensors)"
        )
        if path:
            self.save(path)
