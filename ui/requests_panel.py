"""RequestsPanel: serve the OpenAI API from the window and watch each request.

A "Serve" toggle with host, port and an optional API key starts or stops a
`kvscope.server.Server` on the bridge's engine worker (the same engine the
window shows, so every request's session appears as a session view). The
table lists each request live: time, client, prompt tokens, cached,
prefilled, TTFT, tok/s and where its prefix broke; selecting a row shows
the full explanation and emits `session_selected(sid)` so the window opens
that request's session; "Pin" keeps its session from being retired.
Request sessions get a session view only when selected (`hides`), so an
agent's hundred requests do not become a hundred views. A "Prefix store"
selector sets the engine's eviction policy (lru, hot, workflow) and a
label shows the store's latest eviction decision (`PrefixEvictionDecided`).

Server records change on the engine thread or the server's event loop;
they reach the widgets through a queued signal, never directly.
"""

from __future__ import annotations

import time
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from kvscope.engine.events import Event, PrefixEvictionDecided
from kvscope.engine.prefix_policy import POLICIES
from kvscope.server import ServeOptions, Server
from kvscope.server.records import RequestRecord
from kvscope.ui.bridge import EngineBridge

COLUMNS = ("Time", "Client", "Prompt", "Cached", "Prefilled", "TTFT ms", "tok/s", "Status", "Where the prefix broke")


class RequestsPanel(QWidget):
    session_selected = Signal(str, str)  # engine session id and name of the selected request
    server_changed = Signal(str)  # "" when stopped, else the base URL
    _record_changed = Signal(object)  # RequestRecord, from any thread

    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.server: Server | None = None
        self._rows: dict[int, int] = {}  # request id -> table row
        self._records: dict[int, dict[str, Any]] = {}
        self._unsubscribe: Any = None
        self._build()
        self._record_changed.connect(self._on_record, Qt.ConnectionType.QueuedConnection)
        bridge.events.connect(self._on_events)
        bridge.call(_store_policy, self._show_policy)

    # ------------------------------------------------------------ layout
    def _build(self) -> None:
        self.serve = QPushButton("Serve")
        self.serve.setCheckable(True)
        self.serve.setToolTip("Serve the OpenAI API on this engine (POST /v1/chat/completions, ...)")
        self.serve.toggled.connect(self._on_toggle)
        self.host = QLineEdit("127.0.0.1")
        self.host.setMaximumWidth(130)
        self.port = QSpinBox()
        self.port.setRange(0, 65535)
        self.port.setValue(8000)
        self.port.setToolTip("0 picks a free port")
        self.api_key = QLineEdit()
        self.api_key.setPlaceholderText("API key (optional)")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setMaximumWidth(160)
        self.url = QLabel("not serving")
        self.url.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        top = QHBoxLayout()
        for w in (self.serve, QLabel("host"), self.host, QLabel("port"), self.port, self.api_key, self.url):
            top.addWidget(w)
        top.addStretch(1)
        store_row = self._build_store_row()
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.detail = QLabel("Select a request to see where its prefix broke.")
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.pin = QCheckBox("Pin its session")
        self.pin.setToolTip("A pinned request session is never retired to stay under the memory budget")
        self.pin.setEnabled(False)
        self.pin.toggled.connect(self._on_pin)
        bottom = QHBoxLayout()
        bottom.addWidget(self.detail, 1)
        bottom.addWidget(self.pin)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addLayout(store_row)
        layout.addWidget(self.table, 1)
        layout.addLayout(bottom)

    def _build_store_row(self) -> QHBoxLayout:
        """The prefix-store policy selector and the latest eviction."""
        self.policy = QComboBox()
        self.policy.addItems(list(POLICIES))
        self.policy.setToolTip(
            "Which prefix-store blocks go first under its budget: lru (least recently used), hot (least reused), "
            "workflow (the agent that runs again furthest; agents and steps from X-KVScope-Agent/-Step headers "
            "or metadata.agent/step)"
        )
        self.policy.currentTextChanged.connect(self._on_policy)
        self.eviction = QLabel("no eviction yet")
        store_row = QHBoxLayout()
        for part in (QLabel("Prefix store eviction"), self.policy, self.eviction):
            store_row.addWidget(part)
        store_row.addStretch(1)
        return store_row

    # ------------------------------------------------------------ serving
    def start(self, options: ServeOptions | None = None) -> None:
        """Start serving once the loaded model is known (the call queues behind a model load)."""
        if options is not None:
            self.host.setText(options.host)
            self.port.setValue(options.port)
            self.api_key.setText(options.api_key or "")
        self._pending_options = options
        self.serve.setChecked(True)

    def stop(self) -> None:
        self.serve.setChecked(False)

    def hides(self, sid: str, name: str) -> bool:
        """True for a session a request of this server made: it opens when selected, not by itself."""
        return self.server is not None and self.server.log.is_request_session(sid, name)

    def _on_toggle(self, on: bool) -> None:
        if not on:
            self._shutdown()
            return
        self.url.setText("starting…")
        self.bridge.call(lambda eng: (eng.model.name, str(eng.model.path)), self._launch, self._failed)

    def _options(self) -> ServeOptions:
        base = getattr(self, "_pending_options", None) or ServeOptions()
        self._pending_options = None
        return ServeOptions(
            host=self.host.text().strip() or "127.0.0.1",
            port=self.port.value(),
            api_key=self.api_key.text() or None,
            record=base.record,
            session_budget_bytes=base.session_budget_bytes,
            model_alias=base.model_alias,
        )

    def _launch(self, model: tuple[str, str]) -> None:
        if not self.serve.isChecked() or self.server is not None:
            return
        try:
            server = Server(self.bridge.worker, self._options(), model).start()
        except (OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self.server = server
        self._unsubscribe = server.log.subscribe(self._record_changed.emit)
        for w in (self.host, self.port, self.api_key):
            w.setEnabled(False)
        self.url.setText(f"serving {server.model.id} at {server.base_url}")
        self.server_changed.emit(server.base_url)

    def _failed(self, exc: BaseException) -> None:
        self.url.setText(f"could not serve: {exc}")
        self.serve.blockSignals(True)
        self.serve.setChecked(False)
        self.serve.blockSignals(False)

    def _shutdown(self) -> None:
        if self.server is not None:
            if self._unsubscribe:
                self._unsubscribe()
            self.server.stop()
            self.server = None
            self.server_changed.emit("")
        for w in (self.host, self.port, self.api_key):
            w.setEnabled(True)
        self.url.setText("not serving")

    # ------------------------------------------------------------ prefix store
    def _on_policy(self, name: str) -> None:
        def apply(eng: Any) -> str | None:
            if eng.store is not None:
                eng.set_prefix_policy(name)
            return _store_policy(eng)  # what the engine uses now (without a model: its configured one)

        self.bridge.call(apply, self._show_policy)

    def _show_policy(self, name: str | None) -> None:
        if name is not None:
            self.policy.blockSignals(True)
            self.policy.setCurrentText(name)
            self.policy.blockSignals(False)

    def _on_events(self, batch: list[Event]) -> None:
        decided = [e for e in batch if isinstance(e, PrefixEvictionDecided)]
        if not decided:
            return
        d = decided[-1]
        n = len(d.block_hashes)
        self.eviction.setText(f"evicted {n} block{'s' if n != 1 else ''} ({d.reasons[0]})")
        self.eviction.setToolTip(
            f"{d.policy}: {d.freed_bytes / 1024:.0f} KB freed to stay under {d.budget_bytes / (1 << 20):.1f} MB\n"
            + "\n".join(f"{h}: {why}" for h, why in zip(d.block_hashes, d.reasons))
        )

    # ------------------------------------------------------------ records
    def _on_record(self, rec: RequestRecord) -> None:
        d = rec.to_dict()
        self._records[rec.id] = d
        row = self._rows.get(rec.id)
        if row is None:
            row = self.table.rowCount()
            self.table.insertRow(row)
            self._rows[rec.id] = row
        why = d["prefix_break"] or {}
        cells = (
            time.strftime("%H:%M:%S", time.localtime(d["created"])),
            d["name"],
            str(d["prompt_tokens"]),
            str(d["cached_tokens"]),
            str(d["prefilled_tokens"]),
            f"{d['ttft_ms']:.1f}",
            f"{d['decode_tps']:.1f}",
            d["status"] + (" (retired)" if d["retired"] else "") + (" 📌" if d["pinned"] else ""),
            _break_summary(why),
        )
        for col, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, rec.id)
            if col == len(cells) - 1:
                item.setToolTip(why.get("message", ""))
            self.table.setItem(row, col, item)
        if self.selected_request() == rec.id:
            self._show_detail(d)

    def selected_request(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return int(item.data(Qt.ItemDataRole.UserRole)) if item is not None else None

    def _on_selection(self) -> None:
        rid = self.selected_request()
        if rid is None:
            self.pin.setEnabled(False)
            return
        d = self._records[rid]
        self._show_detail(d)
        if d["session"] and not d["retired"]:
            self.session_selected.emit(d["session"], d["name"])

    def _show_detail(self, d: dict[str, Any]) -> None:
        why = d["prefix_break"] or {}
        lines = [f"<b>{d['name']}</b> — session {d['session'] or '(none)'}; {d['error'] or ''}"]
        if why:
            lines.append(why["message"])
            if why.get("diverged_at") is not None:
                lines.append(
                    f"here: <code>…{_esc(why['before_text'][-40:])}<u>{_esc(why['ours_text'][:40])}</u></code>"
                    f"<br>request {why['closest_request']}: <code>…{_esc(why['before_text'][-40:])}"
                    f"<u>{_esc(why['theirs_text'][:40])}</u></code>"
                )
        self.detail.setText("<br>".join(lines))
        self.pin.blockSignals(True)
        self.pin.setChecked(bool(d["pinned"]))
        self.pin.blockSignals(False)
        self.pin.setEnabled(self.server is not None and bool(d["session"]) and not d["retired"])

    def _on_pin(self, on: bool) -> None:
        rid = self.selected_request()
        if rid is not None and self.server is not None:
            self.server.log.pin(rid, on)


def _store_policy(eng: Any) -> str | None:
    """The engine's prefix-store policy (engine thread)."""
    return eng.store.policy.name if eng.store is not None else eng.config.prefix_policy  # type: ignore[no-any-return]


_SHORT = {"system_prompt": "edited", "different_prompt": "new content", "random_id": "random id"}


def _break_summary(why: dict[str, Any]) -> str:
    """One table cell: "token 31: timestamp in the system prompt (+32 evicted)"."""
    if not why:
        return ""
    if why.get("diverged_at") is None:
        return why["message"]
    cause = _SHORT.get(why["cause"], why["cause"].replace("_", " "))
    where = f" in {why['where']}" if why.get("where") else ""
    evicted = why.get("evicted_tokens", 0)
    more = f" (+{evicted} evicted)" if evicted and why["cause"] != "evicted" else ""
    return f"token {why['diverged_at']}: {cause}{where}{more}"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", "⏎")
