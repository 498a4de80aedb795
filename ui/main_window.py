"""MainWindow: sessions side by side, decisions, latency, menus, status bar.

Promises:
- owns no engine state: it forwards batches of engine events and snapshots
  from the `EngineBridge` to the views, panels and status bar;
- redraws on one ~30 Hz timer, each view from its newest snapshot, so a
  fast decode never costs more than one redraw per frame;
- file work (load model, export trace/session, import segment) runs on the
  engine thread through the bridge; errors are shown, never swallowed.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import QDockWidget, QFileDialog, QMainWindow, QMessageBox, QSplitter, QTabWidget, QWidget

from kvscope.engine.events import (
    EngineError,
    Event,
    PrefillChunk,
    SessionClosed,
    SessionCreated,
    SessionId,
    TurnStarted,
)
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.attach_view import attach_engine
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.decision_panel import DecisionPanel
from kvscope.ui.dialogs import OpenModelDialog
from kvscope.ui.latency_panel import LatencyPanel
from kvscope.ui.requests_panel import RequestsPanel
from kvscope.ui.session_view import SessionView
from kvscope.ui.sessions_panel import SessionsPanel
from kvscope.ui.span_actions import SHORTCUTS
from kvscope.ui.status import StatusBar

REDRAW_MS = 33  # idle: 30 Hz
REDRAW_BUSY_MS = 100  # while a session decodes: 10 Hz leaves the GIL to the decode loop
EDIT_LABELS = {
    "mask": "Mask span",
    "unmask": "Unmask span",
    "compact": "Compact span with summary…",
    "erratum": "Append erratum…",
    "delete": "Delete span",
    "compress": "Compress with policy…",
    "save": "Save span as segment…",
    "undo": "Undo",
}


class MainWindow(QMainWindow):
    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.views: dict[str, SessionView] = {}
        self.active: str | None = None
        self.model_name: str | None = None
        self.last_error: str | None = None
        self.setWindowTitle("kvscope")
        self.resize(1500, 950)
        self._build()
        self._menus()
        bridge.events.connect(self._on_events)
        bridge.snapshot_ready.connect(self._on_snapshot)
        bridge.call_failed.connect(self._on_call_failed)
        bridge.busy_changed.connect(self.status.set_busy)
        self.redraw_timer = QTimer(self)
        self.redraw_timer.setInterval(REDRAW_MS)
        self.redraw_timer.timeout.connect(self.redraw)
        self.redraw_timer.start()

    # ------------------------------------------------------------ layout
    def _build(self) -> None:
        self.sessions = SessionsPanel()
        self.sessions.new_requested.connect(lambda: self.new_session())
        self.sessions.duplicate_requested.connect(self.duplicate_session)
        self.sessions.rename_requested.connect(self.rename_session)
        self.sessions.close_requested.connect(self.close_session)
        self.sessions.current_changed.connect(self.set_active)
        dock = QDockWidget("Sessions", self)
        dock.setObjectName("sessions")
        dock.setWidget(self.sessions)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setChildrenCollapsible(False)
        self.decisions = DecisionPanel(self._apply_policy)
        self.latency = LatencyPanel()
        self.tabs = QTabWidget()
        self.tabs.addTab(self.decisions, "Decisions")
        self.tabs.addTab(self.latency, "Latency && memory")
        self.requests = RequestsPanel(self.bridge)  # kvscope serve: requests as sessions
        self.requests.session_selected.connect(self.open_session)
        self.tabs.addTab(self.requests, "Requests")
        vsplit = QSplitter(Qt.Orientation.Vertical)
        vsplit.addWidget(self.splitter)
        vsplit.addWidget(self.tabs)
        vsplit.setSizes([680, 260])
        self.setCentralWidget(vsplit)
        self.status = StatusBar(self.bridge)
        self.setStatusBar(self.status)

    def _menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        self.open_action = _act(self, file, "Open model…", self._ask_open_model, QKeySequence.StandardKey.Open)
        _act(self, file, "Export trace…", self._ask_export_trace)
        _act(self, file, "Export session…", self._ask_export_session)
        _act(self, file, "Import segment…", self._ask_import_segment)
        _act(self, file, "Import session…", self._ask_import_session)
        _act(self, file, "Attach to engine…", lambda: attach_engine(self))  # vLLM KV events, read-only view
        file.addSeparator()
        _act(self, file, "Quit", self.close, QKeySequence.StandardKey.Quit)
        sess = self.menuBar().addMenu("&Session")
        _act(self, sess, "New", lambda: self.new_session(), QKeySequence.StandardKey.New)
        _act(self, sess, "Duplicate", lambda: self.active and self.duplicate_session(self.active))
        _act(self, sess, "Close", lambda: self.active and self.close_session(self.active))
        edit = self.menuBar().addMenu("&Edit")
        self.edit_actions: dict[str, QAction] = {}
        for key, label in EDIT_LABELS.items():
            act = _act(self, edit, label, lambda k=key: self._span_op(k), SHORTCUTS[key])
            self.edit_actions[key] = act
            if key == "save":
                edit.addSeparator()

    def _span_op(self, key: str) -> None:
        """Edit menu / shortcut: act on the active session's selected span."""
        view = self.active_view()
        if view is not None:
            view.actions_.trigger(key)

    # ------------------------------------------------------------ model
    def load_model(self, id_or_path: str | None) -> int:
        """Load a model on the engine thread; opens one session when done."""
        self.status.start_progress(f"loading {id_or_path or 'the demo model'}…")
        for sid in list(self.views):
            self._remove_view(sid)
        return self.bridge.call(
            lambda eng: (eng.load(id_or_path), eng.info())[1], self._on_model_loaded, self._on_load_failed
        )

    def _on_model_loaded(self, info: dict) -> None:
        self.model_name = info.get("model")
        self.status.finish_progress()
        self.status.set_info(info)
        self.setWindowTitle(f"kvscope — {self.model_name}")
        if info.get("sessions", 0) == 0:  # saved sessions of this model reopen by themselves
            self.new_session("chat 1")
        errors = info.get("load_errors") or []
        if errors:
            self.status.showMessage(f"{len(errors)} saved session(s) could not be reopened: {errors[0]}")

    def _on_load_failed(self, exc: BaseException) -> None:
        self.status.finish_progress()
        self.status.showMessage(f"No model loaded: {exc} — use File ▸ Open model…")
        box = QMessageBox(QMessageBox.Icon.Critical, "Could not load the model", str(exc), parent=self)
        box.setInformativeText("Use File ▸ Open model… to pick a model folder or a hub id.")
        box.open()  # non-modal: the window stays usable

    def _ask_open_model(self) -> None:
        dlg = OpenModelDialog(self)
        if dlg.exec():
            self.load_model(dlg.model())

    # ------------------------------------------------------------ sessions
    def new_session(self, name: str | None = None, system: str | None = None) -> int:
        return self.bridge.call(lambda eng: eng.new_session(name, system))

    def duplicate_session(self, sid: str) -> int:
        return self.bridge.call(lambda eng: eng.duplicate_session(SessionId(sid)))

    def rename_session(self, sid: str, name: str) -> int:
        return self.bridge.call(lambda eng: eng.rename_session(SessionId(sid), name))

    def close_session(self, sid: str) -> int:
        return self.bridge.call(lambda eng: eng.close_session(SessionId(sid)))

    def _add_view(self, sid: str, name: str) -> SessionView:
        view = SessionView(self.bridge, SessionId(sid), name)
        view.activated.connect(self.set_active)
        view.actions_.report_ready.connect(lambda op, rep, s=sid: self.decisions.on_report(s, op, rep))
        view.actions_.failed.connect(lambda op, msg: self.status.showMessage(f"{op} failed: {msg}", 10_000))
        self.views[sid] = view
        self.splitter.addWidget(view)
        self.sessions.add(sid, name)
        self.bridge.want_snapshot(SessionId(sid))
        self.set_active(sid)
        return view

    def _remove_view(self, sid: str) -> None:
        view = self.views.pop(sid, None)
        if view is not None:
            view.setParent(None)
            view.deleteLater()
        self.sessions.remove(sid)
        if self.active == sid:
            self.set_active(next(iter(self.views), None))

    def set_active(self, sid: str | None) -> None:
        if sid == self.active:
            return
        self.active = sid
        for s, v in self.views.items():
            v.setStyleSheet("SessionView { border: 1px solid #4a90d9; }" if s == sid else "")
        if sid is not None:
            self.sessions.select(sid)
            self.bridge.want_snapshot(SessionId(sid))
        self.decisions.set_session(sid)

    def open_session(self, sid: str, name: str) -> None:
        """Show a session that has no view yet (a served request) and make it active."""
        if sid not in self.views:
            self._add_view(sid, name)
        self.set_active(sid)

    def active_view(self) -> SessionView | None:
        return self.views.get(self.active or "")

    def _apply_policy(self, policy: str, ratio: float | None, budget: int | None) -> None:
        view = self.active_view()
        if view is not None:
            view.actions_.compress(policy, ratio, budget)

    # ------------------------------------------------------------ engine -> window
    def _on_events(self, batch: list[Event]) -> None:
        for ev in batch:
            self._dispatch(ev)

    def _dispatch(self, ev: Event) -> None:
        sid = getattr(ev, "session", None)
        if isinstance(ev, SessionCreated):
            if not self.requests.hides(ev.session, ev.name):  # a served request opens when selected
                self._add_view(ev.session, ev.name)
        elif isinstance(ev, SessionClosed):
            self._remove_view(ev.session)
        elif isinstance(ev, TurnStarted) and ev.prefilled_tokens > 256:
            self.status.start_progress(f"prefill {ev.prefilled_tokens} tokens", ev.prefilled_tokens)
        elif isinstance(ev, PrefillChunk):
            self.status.set_progress(ev.start + ev.n_tokens, ev.total)
        elif isinstance(ev, EngineError):
            self.last_error = ev.message
            self.status.showMessage(f"{ev.kind}: {ev.message}", 10_000)
        if sid in self.views:
            self.views[sid].on_event(ev)
        self.latency.on_event(ev)
        self.decisions.on_event(ev)

    def _on_snapshot(self, snap: SessionSnapshot) -> None:
        view = self.views.get(snap.session)
        if view is None:
            return
        view.on_snapshot(snap)
        self.sessions.set_name(snap.session, snap.name)
        self.latency.on_snapshot(snap)
        self.decisions.on_snapshot(snap)

    def _on_call_failed(self, ticket: int, kind: str, message: str) -> None:
        self.last_error = message
        self.status.showMessage(f"{kind}: {message}", 10_000)

    def redraw(self) -> int:
        """One frame: redraw what changed; returns how many widgets drew."""
        drawn = sum(v.refresh() for v in self.views.values())
        busy = any(v.generating for v in self.views.values())
        self.redraw_timer.setInterval(REDRAW_BUSY_MS if busy else REDRAW_MS)
        return drawn + int(self.latency.refresh())

    # ------------------------------------------------------------ files
    def export_trace(self, path: str | Path) -> int:
        return self.bridge.call(
            lambda eng: eng.export_trace(path), lambda p: self.status.showMessage(f"trace written to {p}", 10_000)
        )

    def export_session(self, sid: str, path: str | Path) -> int:
        return self.bridge.call(
            lambda eng: eng.export_session(SessionId(sid), Path(path)),
            lambda p: self.status.showMessage(f"session written to {p or path}", 10_000),
        )

    def _ask_export_trace(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export trace", "kvscope-trace.json", "Chrome/Perfetto trace (*.json)"
        )
        if path:
            self.export_trace(path)

    def _ask_export_session(self) -> None:
        if self.active is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Export session", f"{self.active}.kvsession", "kvscope session (*.kvsession)"
        )
        if path:
            self.export_session(self.active, path)

    def _ask_import_segment(self) -> None:
        view = self.active_view()
        if view is None:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Import segment", "", "Segments (*.safetensors)")
        if path:
            view.actions_.splice_file(path, None)

    def import_session(self, path: str | Path) -> int:
        return self.bridge.call(
            lambda eng: eng.import_session(Path(path)),
            lambda sid: self.status.showMessage(f"session {sid} opened from {path}", 10_000),
        )

    def _ask_import_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import session", "", "kvscope session (*.kvsession)")
        if path:
            self.import_session(path)

    def closeEvent(self, ev: QCloseEvent) -> None:  # noqa: N802
        self.redraw_timer.stop()
        self.requests.stop()
        for v in self.views.values():
            if v.generating:
                self.bridge.cancel(v.sid)
        super().closeEvent(ev)


def _act(win: QMainWindow, menu: object, text: str, slot: object, key: object = None) -> QAction:
    act = QAction(text, win)
    if key is not None:
        act.setShortcut(QKeySequence(key))
    act.triggered.connect(lambda _=False: slot())  # type: ignore[operator]
    menu.addAction(act)  # type: ignore[attr-defined]
    return act
