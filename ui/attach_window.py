"""The attach dialog (File -> Attach to engine…) and `kvscope attach --window`.

Promises:
- `attach_engine(window)` asks for the endpoints, starts an `AttachProcess`
  (the stream is decoded in a process of its own) and docks an
  `AttachView`; a bad endpoint is shown in a message box, nothing is docked;
- `AttachWindow` holds several views side by side, one prompt box for all of
  them, and the number of blocks they all hold, counted on a worker thread
  once a second (the Qt thread never waits for an engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDockWidget,
    QFormLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from kvscope.attach import AttachClient
from kvscope.attach.fleet import common_content
from kvscope.attach.metrics import MetricsPoller
from kvscope.attach.process_client import AttachProcess
from kvscope.ui.attach_view import AttachView, emit_safely, load_tokenizer_async


class AttachDialog(QDialog):
    """Endpoints of one engine to attach to."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Attach to engine")
        form = QFormLayout(self)
        self.endpoint = QLineEdit("tcp://127.0.0.1:5557")
        self.replay = QLineEdit("tcp://127.0.0.1:5558")
        self.topic = QLineEdit("")
        self.bind = QCheckBox("bind (vLLM connects to a non-wildcard endpoint)")
        self.bind.setChecked(True)
        self.tokenizer = QLineEdit("")
        self.tokenizer.setPlaceholderText("served model's folder (optional): shows words")
        form.addRow("KV events (PUB)", self.endpoint)
        form.addRow("replay (ROUTER)", self.replay)
        form.addRow("topic prefix", self.topic)
        form.addRow("", self.bind)
        form.addRow("tokenizer", self.tokenizer)
        self.metrics = QLineEdit("")
        self.metrics.setPlaceholderText("http://127.0.0.1:8000/metrics (optional): hit rate, usage")
        form.addRow("server /metrics", self.metrics)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def make_view(self) -> AttachView:
        """The client (in a process of its own) and its view; ValueError (shown by the caller) for a bad endpoint."""
        url = self.metrics.text().strip()
        poller = MetricsPoller(url) if url else None  # a bad URL fails before any socket opens
        try:
            client = AttachProcess(
                self.endpoint.text().strip(),
                self.replay.text().strip() or None,
                self.topic.text(),
                bind=self.bind.isChecked(),
            )
        except ValueError:
            if poller is not None:
                poller.close()
            raise
        client.metrics = poller
        return AttachView(client, load_tokenizer_async(self.tokenizer.text().strip() or None))


def dock_view(window: QMainWindow, view: AttachView) -> QDockWidget:
    dock = QDockWidget(f"Attached: {view.client.name}", window)
    dock.setObjectName(f"attach {view.client.name}")
    dock.setWidget(view)
    dock.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    dock.destroyed.connect(lambda *_: view.close_client())
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    return dock


def attach_engine(window: QMainWindow, dialog: AttachDialog | None = None) -> QDockWidget | None:
    """File -> Attach to engine…: ask, then dock a live read-only view of it."""
    dlg = dialog or AttachDialog(window)
    if dialog is None and dlg.exec() != QDialog.DialogCode.Accepted:
        return None
    try:
        view = dlg.make_view()
    except ValueError as exc:
        QMessageBox.warning(window, "Attach to engine", str(exc))
        return None
    return dock_view(window, view)


class AttachWindow(QMainWindow):
    """Several attached engines side by side (`kvscope attach --window`)."""

    _common_counted = Signal(object)  # blocks every engine holds, or the error, from the worker

    def __init__(
        self,
        clients: Sequence[AttachClient | AttachProcess],
        tokenizer: Future[Any] | None = None,
        close_clients: bool = True,
    ) -> None:
        super().__init__()
        self._close_clients = close_clients
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-attach-common")
        self._counting = False
        self._common_counted.connect(self._show_common)
        self.setWindowTitle("kvscope attach")
        self.resize(1400, 900)
        self.views = [AttachView(c, tokenizer if i == 0 else None) for i, c in enumerate(clients)]
        split = QSplitter(Qt.Orientation.Horizontal)
        for v in self.views:
            split.addWidget(v)
        box = QWidget()
        lay = QVBoxLayout(box)
        lay.addWidget(split, 1)
        self.prompt = QLineEdit()  # one prompt for every engine: which would hit, and how much
        self.prompt.setPlaceholderText("a prompt for every engine: the cached prefix each would find")
        self.prompt.textChanged.connect(self._prompt_every_engine)
        self.prompt.setVisible(len(self.views) > 1)
        lay.addWidget(self.prompt)
        self.common = QLabel()
        lay.addWidget(self.common)
        self.setCentralWidget(box)
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh_common)
        self.timer.start()
        self.refresh_common()

    def _prompt_every_engine(self, text: str) -> None:
        for v in self.views:
            v.prompt.setText(text)

    def refresh_common(self) -> None:
        tok = next((v.tokenizer for v in self.views if v.tokenizer is not None), None)
        for v in self.views:
            if v.tokenizer is None and tok is not None:
                v.tokenizer = tok
        if len(self.views) > 1 and not self._counting:
            self._counting = True  # on the worker: every engine's content, under each one's lock
            self._worker.submit(self._count_common, [v.client for v in self.views])

    def _count_common(self, clients: list[AttachClient | AttachProcess]) -> None:
        try:
            result: Any = len(common_content(clients))
        except Exception as exc:  # noqa: BLE001 - shown in the label
            result = exc
        emit_safely(self._common_counted, result)

    def _show_common(self, result: Any) -> None:
        self._counting = False
        if isinstance(result, Exception):
            self.common.setText(f"blocks held in common: not known ({result})")
        else:
            self.common.setText(f"blocks held by all {len(self.views)} engines (same tokens from the root): {result}")

    def closeEvent(self, ev: Any) -> None:  # noqa: N802 - Qt override
        self.timer.stop()
        self._worker.shutdown(wait=True)
        for v in self.views:
            v.close_client(self._close_clients)
        super().closeEvent(ev)
