"""FileActions: the File menu's work — open a model, export / import traces,
sessions and segments — run on the engine thread through the bridge.

Promises:
- a model load changes nothing until it succeeds: the session views stay
  and the status bar keeps naming the model still loaded when it fails
  (the engine keeps its model and sessions on a failed load); the error
  is shown (dialog + a status-bar error that stays);
- every result or error is reported in the status bar, never swallowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtWidgets import QFileDialog, QMessageBox

from kvscope.engine.events import SessionId
from kvscope.ui.dialogs import OpenModelDialog

if TYPE_CHECKING:
    from kvscope.ui.main_window import MainWindow

MESSAGE_MS = 10_000


class FileActions:
    def __init__(self, win: MainWindow) -> None:
        self.win = win
        self.loading: str | None = None

    # ------------------------------------------------------------ model
    def load_model(self, id_or_path: str | None) -> int:
        """Load a model on the engine thread; the views change only when it loaded."""
        win = self.win
        self.loading = id_or_path or "the demo model"
        win.status.start_progress(f"loading {self.loading}…")
        return win.bridge.call(
            lambda eng: (eng.load(id_or_path), eng.info())[1], self._on_model_loaded, self._on_load_failed
        )

    def _on_model_loaded(self, info: dict) -> None:
        win = self.win
        self.loading = None
        win.model_name = info.get("model")
        win.status.finish_progress()
        win.status.clear_error()
        win.status.set_info(info)
        win.setWindowTitle(f"kvscope — {win.model_name}")
        if info.get("sessions", 0) == 0:  # saved sessions of this model reopen by themselves
            win.new_session()
        errors = info.get("load_errors") or []
        if errors:
            win.show_error(f"{len(errors)} saved session(s) could not be reopened: {errors[0]}")

    def _on_load_failed(self, exc: BaseException) -> None:
        win = self.win
        what, self.loading = self.loading, None
        win.status.finish_progress()
        still = f"still using {win.model_name}" if win.model_name else "no model loaded"
        win.show_error(f"could not load {what}: {exc} — {still}; use File ▸ Open model…")
        box = QMessageBox(QMessageBox.Icon.Critical, "Could not load the model", str(exc), parent=win)
        box.setInformativeText(f"Nothing changed: {still}. Use File ▸ Open model… to pick a model folder or a hub id.")
        box.open()  # non-modal: the window stays usable
        win.status.request_info()  # the bar says what is loaded

    def ask_open_model(self) -> None:
        dlg = OpenModelDialog(self.win)
        if dlg.exec():
            self.load_model(dlg.model())

    # ------------------------------------------------------------ files
    def export_trace(self, path: str | Path) -> int:
        return self.win.bridge.call(lambda eng: eng.export_trace(path), lambda p: self._said(f"trace written to {p}"))

    def export_session(self, sid: str, path: str | Path) -> int:
        return self.win.bridge.call(
            lambda eng: eng.export_session(SessionId(sid), Path(path)),
            lambda p: self._said(f"session written to {p or path}"),
        )

    def import_session(self, path: str | Path) -> int:
        return self.win.bridge.call(
            lambda eng: eng.import_session(Path(path)), lambda sid: self._said(f"session {sid} opened from {path}")
        )

    def _said(self, text: str) -> None:
        self.win.status.showMessage(text, MESSAGE_MS)

    def ask_export_trace(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self.win, "Export trace", "kvscope-trace.json", "Chrome/Perfetto trace (*.json)"
        )
        if path:
            self.export_trace(path)

    def ask_export_session(self) -> None:
        view = self.win.active_view()
        if view is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self.win, "Export session", f"{view.name}.kvsession", "kvscope session (*.kvsession)"
        )
        if path:
            self.export_session(view.sid, path)

    def ask_import_segment(self) -> None:
        view = self.win.active_view()
        if view is None:
            return
        path, _ = QFileDialog.getOpenFileName(self.win, "Import segment", "", "Segments (*.safetensors)")
        if path:
            view.actions_.splice_file(path, None)

    def ask_import_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.win, "Import session", "", "kvscope session (*.kvsession)")
        if path:
            self.import_session(path)
