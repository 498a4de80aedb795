"""FileActions: the File menu's work — open a model, export / import traces,
sessions and segments — run on the engine thread through the bridge.

Promises:
- a model load changes nothing until it succeeds: the session views stay
  and the status bar keeps naming the model still loaded when it fails
  (the engine keeps its model and sessions on a failed load); the error
  is shown (dialog + `failed(text)`, which the window keeps on screen);
- owns the name of the loaded model (`model_name`) and says when one
  loaded (`model_loaded(info)`, with `engine.info()`);
- every result is said in the status bar and every error goes out as
  `failed`, never swallowed.

Knows the window only as a parent widget and the active view as a
callable: no import of the window (an import contract).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMenu, QMessageBox, QWidget

from kvscope.engine.events import SessionId
from kvscope.ui.actions import menu_action
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.dialogs import OpenModelDialog
from kvscope.ui.session_view import SessionView
from kvscope.ui.status import StatusBar

MESSAGE_MS = 10_000


class FileActions(QObject):
    model_loaded = Signal(object)  # engine.info() right after a model loaded
    failed = Signal(str)  # an error for the person, to stay on screen

    def __init__(
        self,
        bridge: EngineBridge,
        status: StatusBar,
        active_view: Callable[[], SessionView | None],
        window: QWidget,
    ) -> None:
        super().__init__(window)
        self._bridge, self._status, self._active_view, self._window = bridge, status, active_view, window
        self.model_name: str | None = None
        self.loading: str | None = None

    def add_to(self, menu: QMenu) -> QAction:
        """Put the file actions in `menu`; returns "Open model…"."""
        opened = menu_action(self._window, menu, "Open model…", self.ask_open_model, QKeySequence.StandardKey.Open)
        menu_action(self._window, menu, "Export trace…", self.ask_export_trace)
        menu_action(self._window, menu, "Export session…", self.ask_export_session)
        menu_action(self._window, menu, "Import segment…", self.ask_import_segment)
        menu_action(self._window, menu, "Import session…", self.ask_import_session)
        return opened

    # ------------------------------------------------------------ model
    def load_model(self, id_or_path: str | None) -> int:
        """Load a model on the engine thread; the views change only when it loaded."""
        self.loading = id_or_path or "the demo model"
        self._status.start_progress(f"loading {self.loading}…")
        return self._bridge.call(
            lambda eng: (eng.load(id_or_path), eng.info())[1], self._on_model_loaded, self._on_load_failed
        )

    def _on_model_loaded(self, info: dict[str, Any]) -> None:
        self.loading = None
        self.model_name = info.get("model")
        self._status.finish_progress()
        self._status.clear_error()
        self._status.set_info(info)
        self.model_loaded.emit(info)

    def _on_load_failed(self, exc: BaseException) -> None:
        what, self.loading = self.loading, None
        self._status.finish_progress()
        still = f"still using {self.model_name}" if self.model_name else "no model loaded"
        self.failed.emit(f"could not load {what}: {exc} — {still}; use File ▸ Open model…")
        box = QMessageBox(QMessageBox.Icon.Critical, "Could not load the model", str(exc), parent=self._window)
        box.setInformativeText(f"Nothing changed: {still}. Use File ▸ Open model… to pick a model folder or a hub id.")
        box.open()  # non-modal: the window stays usable
        self._status.request_info()  # the bar says what is loaded

    def ask_open_model(self) -> None:
        dlg = OpenModelDialog(self._window)
        if dlg.exec():
            self.load_model(dlg.model())

    # ------------------------------------------------------------ files
    def export_trace(self, path: str | Path) -> int:
        return self._bridge.call(lambda eng: eng.export_trace(path), lambda p: self._said(f"trace written to {p}"))

    def export_session(self, sid: str, path: str | Path) -> int:
        return self._bridge.call(
            lambda eng: eng.export_session(SessionId(sid), Path(path)),
            lambda p: self._said(f"session written to {p or path}"),
        )

    def import_session(self, path: str | Path) -> int:
        return self._bridge.call(
            lambda eng: eng.import_session(Path(path)), lambda sid: self._said(f"session {sid} opened from {path}")
        )

    def _said(self, text: str) -> None:
        self._status.showMessage(text, MESSAGE_MS)

    def ask_export_trace(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self._window, "Export trace", "kvscope-trace.json", "Chrome/Perfetto trace (*.json)"
        )
        if path:
            self.export_trace(path)

    def ask_export_session(self) -> None:
        view = self._active_view()
        if view is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self._window, "Export session", f"{view.name}.kvsession", "kvscope session (*.kvsession)"
        )
        if path:
            self.export_session(view.sid, path)

    def ask_import_segment(self) -> None:
        view = self._active_view()
        if view is None:
            return
        path, _ = QFileDialog.getOpenFileName(self._window, "Import segment", "", "Segments (*.safetensors)")
        if path:
            view.actions_.splice_file(path, None)

    def ask_import_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self._window, "Import session", "", "kvscope session (*.kvsession)")
        if path:
            self.import_session(path)
