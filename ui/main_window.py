"""MainWindow: session tabs (or two side by side), report, decisions,
latency, menus, status bar.

Promises:
- owns no engine state: it forwards batches of engine events and snapshots
  from the `EngineBridge` to the views, panels and status bar;
- the active session changes only on a person's action: a selection, click
  or typing inside a view (focus), a click on its tab or its list entry, a
  new session; a streaming view never takes the role by itself;
- fits a 1024 px wide screen with any number of sessions (tabs), the
  status bar always visible;
- redraws on one ~30 Hz timer, each view from its newest snapshot, so a
  fast decode never costs more than one redraw per frame;
- the prefix tree tab shows every open session's cached blocks as one tree;
- the progress bar closes at 100 % when its load or turn ends in any way;
- file work runs on the engine thread through the bridge (`FileActions`);
  errors stay on screen until dismissed, never swallowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QCloseEvent, QKeySequence, QShowEvent
from PySide6.QtWidgets import QApplication, QDockWidget, QMainWindow, QSplitter, QTabWidget, QWidget

from kvscope.engine.events import EngineError, Event, SessionClosed, SessionCreated, SessionId, TurnStarted
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.actions import menu_action
from kvscope.ui.attach_view import attach_engine
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.decision_panel import DecisionPanel
from kvscope.ui.edit_menu import EditMenu
from kvscope.ui.edit_reports import EditReports
from kvscope.ui.fidelity_jobs import FidelityJobs
from kvscope.ui.file_actions import MESSAGE_MS, FileActions
from kvscope.ui.latency_panel import LatencyPanel
from kvscope.ui.naming import next_chat_name, unique_name
from kvscope.ui.prefill_progress import PrefillProgress
from kvscope.ui.prefix_tree import PrefixTreePanel
from kvscope.ui.report_panel import ReportPanel
from kvscope.ui.requests_panel import RequestsPanel
from kvscope.ui.session_area import SessionArea
from kvscope.ui.session_view import SessionView
from kvscope.ui.sessions_panel import SessionsPanel
from kvscope.ui.status import StatusBar

REDRAW_MS = 33  # idle: 30 Hz
REDRAW_BUSY_MS = 100  # while a session decodes: 10 Hz leaves the GIL to the decode loop


class MainWindow(QMainWindow):
    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.views: dict[str, SessionView] = {}
        self.active: str | None = None
        self._previous: str | None = None
        self.last_error: str | None = None
        self._pending_names: set[str] = set()
        self.fidelity = FidelityJobs(bridge, self)
        self.setWindowTitle("kvscope")
        self.resize(1280, 800)
        self._build()
        self.files = FileActions(bridge, self.status, self.active_view, self)
        self.files.model_loaded.connect(self._on_model_loaded)
        self.files.failed.connect(self.show_error)
        self._menus()
        bridge.events.connect(self._on_events)
        bridge.snapshot_ready.connect(self._on_snapshot)
        bridge.call_failed.connect(self._on_call_failed)
        bridge.busy_changed.connect(lambda _busy: self._update_busy())
        self._focus_hooked = False
        self.redraw_timer = QTimer(self)
        self.redraw_timer.setInterval(REDRAW_MS)
        self.redraw_timer.timeout.connect(self.redraw)
        self.redraw_timer.start()

    # ------------------------------------------------------------ layout
    def _build(self) -> None:
        self.sessions = SessionsPanel()
        self.sessions.new_requested.connect(self._new_from_panel)
        self.sessions.duplicate_requested.connect(self.duplicate_session)
        self.sessions.rename_requested.connect(self.rename_session)
        self.sessions.close_requested.connect(self.close_session)
        self.sessions.current_changed.connect(self.set_active)
        dock = QDockWidget("Sessions", self)
        dock.setObjectName("sessions")
        dock.setWidget(self.sessions)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable)
        self.sessions.setMaximumWidth(220)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)
        self.area = SessionArea()
        self.area.tab_chosen.connect(self.set_active)
        self.report = ReportPanel()
        self.decisions = DecisionPanel(self._apply_policy)
        self.latency = LatencyPanel()
        self.tabs = QTabWidget()
        self.tabs.addTab(self.report, "Report")
        self.tabs.addTab(self.decisions, "Decisions")
        self.tabs.addTab(self.latency, "Latency && memory")
        self.prefix_tree = PrefixTreePanel()
        self.tabs.addTab(self.prefix_tree, "Prefix tree")
        self.tabs.currentChanged.connect(lambda _i: self.prefix_tree.refresh())
        self.requests = RequestsPanel(self.bridge)  # kvscope serve: requests as sessions
        self.requests.session_selected.connect(self.open_session)
        self.tabs.addTab(self.requests, "Requests")
        vsplit = QSplitter(Qt.Orientation.Vertical)
        vsplit.setChildrenCollapsible(False)
        vsplit.addWidget(self.area)
        vsplit.addWidget(self.tabs)
        vsplit.setStretchFactor(0, 3)
        vsplit.setStretchFactor(1, 1)
        vsplit.setSizes([540, 200])
        self.setCentralWidget(vsplit)
        self.status = StatusBar(self.bridge)
        self.setStatusBar(self.status)
        self.progress = PrefillProgress(self.status, self._name_of)
        self.reports = EditReports(
            self.report, self.decisions, self.fidelity, self.views.get, lambda: self.tabs.setCurrentWidget(self.report)
        )

    def _menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        self.open_action = self.files.add_to(file)
        menu_action(self, file, "Attach to engine…", lambda: attach_engine(self))  # vLLM KV events, read-only view
        file.addSeparator()
        menu_action(self, file, "Quit", self.close, QKeySequence.StandardKey.Quit)
        sess = self.menuBar().addMenu("&Session")
        menu_action(self, sess, "New", self._new_from_panel, "Ctrl+N")
        menu_action(self, sess, "Duplicate", lambda: self.active and self.duplicate_session(self.active))
        menu_action(self, sess, "Close", lambda: self.active and self.close_session(self.active))
        sess.addSeparator()
        self.compare_action = menu_action(self, sess, "Compare two side by side", self.toggle_compare, "Ctrl+\\")
        self.compare_action.setCheckable(True)
        edit = self.menuBar().addMenu("&Edit")
        self.edit = EditMenu(self, edit, self.active_view, lambda text: self.status.showMessage(text, MESSAGE_MS))
        self.edit_actions = self.edit.actions

    # ------------------------------------------------------------ model and files
    def load_model(self, id_or_path: str | None) -> int:
        return self.files.load_model(id_or_path)

    def export_trace(self, path: str | Path) -> int:
        return self.files.export_trace(path)

    def export_session(self, sid: str, path: str | Path) -> int:
        return self.files.export_session(sid, path)

    def import_session(self, path: str | Path) -> int:
        return self.files.import_session(path)

    @property
    def model_name(self) -> str | None:
        """The loaded model's name (None before the first load)."""
        return self.files.model_name

    def _on_model_loaded(self, info: dict[str, Any]) -> None:
        self.setWindowTitle(f"kvscope — {self.model_name}")
        if info.get("sessions", 0) == 0:  # saved sessions of this model reopen by themselves
            self.new_session()
        errors = info.get("load_errors") or []
        if errors:
            self.show_error(f"{len(errors)} saved session(s) could not be reopened: {errors[0]}")

    def show_error(self, text: str) -> None:
        self.last_error = text
        self.status.show_error(text)

    # ------------------------------------------------------------ sessions
    def next_name(self) -> str:
        """“chat N” with the smallest N no open session uses."""
        return next_chat_name({v.name for v in self.views.values()} | self._pending_names)

    def new_session(self, name: str | None = None, system: str | None = None) -> int:
        name = name or self.next_name()
        self._pending_names.add(name)  # asked for, not yet created: the next name must differ
        return self.bridge.call(
            lambda eng: eng.new_session(name, system or None),
            lambda _sid: self._pending_names.discard(name),
            lambda _exc: self._pending_names.discard(name),
        )

    def _new_from_panel(self) -> int:
        """A new session with the system prompt typed in the sessions panel."""
        return self.new_session(system=self.sessions.system_prompt())

    def duplicate_session(self, sid: str) -> int:
        return self.bridge.call(lambda eng: eng.duplicate_session(SessionId(sid)))

    def rename_session(self, sid: str, name: str) -> int:
        return self.bridge.call(lambda eng: eng.rename_session(SessionId(sid), name))

    def close_session(self, sid: str) -> int:
        return self.bridge.call(lambda eng: eng.close_session(SessionId(sid)))

    def _unique_name(self, sid: str, name: str) -> str:
        self._pending_names.discard(name)
        return unique_name(name, {v.name for s, v in self.views.items() if s != sid})

    def _add_view(self, sid: str, name: str) -> SessionView:
        unique = self._unique_name(sid, name)
        view = SessionView(self.bridge, SessionId(sid), unique)
        view.activated.connect(self.set_active)
        view.selection_changed.connect(lambda s, _lo, _hi: self.edit.refresh() if s == self.active else None)
        view.turn_ended.connect(self._on_turn_ended)
        view.notice.connect(lambda text: self.status.showMessage(text, MESSAGE_MS))
        view.actions_.failed.connect(lambda op, msg: self.show_error(f"{op} on {view.name} failed: {msg}"))
        view.actions_.submitted.connect(lambda op: self._say_if_queued(view, op))
        self.reports.attach(view)
        self.views[sid] = view
        self.area.add(view, sid, unique)
        self.sessions.add(sid, unique)
        if unique != name:  # imports and copies can repeat a name: keep names unique
            self.rename_session(sid, unique)
        self.bridge.want_snapshot(SessionId(sid))
        self.set_active(sid)
        return view

    def _remove_view(self, sid: str) -> None:
        view = self.views.pop(sid, None)
        if view is not None:
            self.area.remove(view)
            view.setParent(None)
            view.deleteLater()
        self.sessions.remove(sid)
        if self._previous == sid:
            self._previous = None
        if self.active == sid:
            self.active = None
            self.set_active(next(iter(self.views), None))
        self.progress.end(sid)
        self.fidelity.skip(sid)
        self.compare_action.setChecked(self.area.comparing)

    def set_active(self, sid: str | None) -> None:
        if sid == self.active or (sid is not None and sid not in self.views):
            return
        self._previous, self.active = self.active, sid
        for s, v in self.views.items():
            v.setStyleSheet("SessionView { border: 1px solid #4a90d9; }" if s == sid else "")
        if sid is not None:
            self.sessions.select(sid)
            self.area.show_view(self.views[sid])
            self.bridge.want_snapshot(SessionId(sid))
        self.decisions.set_session(sid)
        self.edit.refresh()

    def open_session(self, sid: str, name: str) -> None:
        """Show a session that has no view yet (a served request) and make it active."""
        if sid not in self.views:
            self._add_view(sid, name)
        self.set_active(sid)

    def active_view(self) -> SessionView | None:
        return self.views.get(self.active or "")

    def toggle_compare(self) -> None:
        """Show the active session and the one before it side by side (or fold back)."""
        if self.area.comparing:
            self.area.end_compare()
        else:
            view = self.active_view()
            other = self.views.get(self._previous or "") or next(
                (v for v in self.views.values() if v is not view), None
            )
            if view is not None and other is not None:
                self.area.compare(other, view)
        self.compare_action.setChecked(self.area.comparing)

    def compare(self, left: str, right: str) -> None:
        self.area.compare(self.views[left], self.views[right])
        self.compare_action.setChecked(True)

    def _on_focus_changed(self, _old: QWidget | None, new: QWidget | None) -> None:
        """Typing or clicking into a view makes it the active one."""
        w = new
        while w is not None and not isinstance(w, SessionView):
            w = w.parentWidget()
        if isinstance(w, SessionView) and w.sid in self.views:
            self.set_active(w.sid)

    def _apply_policy(self, policy: str, ratio: float | None, budget: int | None) -> None:
        view = self.active_view()
        if view is not None:
            view.actions_.compress(policy, ratio, budget)

    def _say_if_queued(self, view: SessionView, op: str) -> None:
        busy = [v.name for v in self.views.values() if v.generating and v is not view]
        if busy:
            self.status.showMessage(
                f"{op} on {view.name} is queued behind {', '.join(busy)} (generating): "
                "it runs when that turn ends — press Stop there to run it now",
                MESSAGE_MS,
            )
        self._update_busy()

    def _update_busy(self) -> None:
        generating = [v.name for v in self.views.values() if v.generating]
        if generating:
            self.status.set_busy(f"generating: {', '.join(generating)}")
        else:
            self.status.set_busy("engine busy" if self.bridge.in_flight() else "")

    def _on_turn_ended(self, sid: str) -> None:
        self.progress.end(sid)
        self._update_busy()
        self.edit.refresh()

    def _name_of(self, sid: str) -> str:
        view = self.views.get(sid)
        return view.name if view is not None else sid

    # ------------------------------------------------------------ engine -> window
    def _on_events(self, batch: list[Event]) -> None:
        for ev in batch:
            self._dispatch(ev)

    def _dispatch(self, ev: Event) -> None:
        sid = getattr(ev, "session", None)
        self.progress.on_event(ev)
        if isinstance(ev, SessionCreated):
            if not self.requests.hides(ev.session, ev.name):  # a served request opens when selected
                self._add_view(ev.session, ev.name)
        elif isinstance(ev, SessionClosed):
            self._remove_view(ev.session)
            self.prefix_tree.forget(ev.session)
        elif isinstance(ev, TurnStarted):
            self.fidelity.skip(ev.session)  # the turn changes the cache a queued measurement was for
            self._update_busy()
            self.edit.refresh()
        elif isinstance(ev, EngineError):
            where = f" in {self.views[ev.session].name}" if ev.session in self.views else ""
            self.show_error(f"{ev.kind}{where}: {ev.message}")
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
        self.area.set_name(view, snap.name)
        self.latency.on_snapshot(snap)
        self.decisions.on_snapshot(snap)
        self.prefix_tree.on_snapshot(snap)
        if snap.session == self.active:
            self.edit.refresh()

    def _on_call_failed(self, ticket: int, kind: str, message: str) -> None:
        if self.last_error is None or message not in self.last_error:
            self.show_error(f"{kind}: {message}")

    def redraw(self) -> int:
        """One frame: redraw what changed; returns how many widgets drew."""
        drawn = sum(v.refresh() for v in self.views.values())
        busy = any(v.generating for v in self.views.values())
        self.redraw_timer.setInterval(REDRAW_BUSY_MS if busy else REDRAW_MS)
        return drawn + int(self.latency.refresh()) + int(self.prefix_tree.refresh())

    def showEvent(self, ev: QShowEvent) -> None:  # noqa: N802
        if not self._focus_hooked:  # follow focus while shown (a closed window may be shown again)
            _app().focusChanged.connect(self._on_focus_changed)
            self._focus_hooked = True
        super().showEvent(ev)

    def closeEvent(self, ev: QCloseEvent) -> None:  # noqa: N802
        self.redraw_timer.stop()
        self.requests.stop()
        if self._focus_hooked:  # a window can be closed more than once
            _app().focusChanged.disconnect(self._on_focus_changed)
            self._focus_hooked = False
        for v in self.views.values():
            if v.generating:
                self.bridge.cancel(v.sid)
        super().closeEvent(ev)


def _app() -> QApplication:
    app = QApplication.instance()
    assert isinstance(app, QApplication), "the window runs in a QApplication"
    return app
