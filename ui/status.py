"""StatusBar: model, device, dtype, BLAS, memory in use, and a progress bar
for model loading and long prefills.

`engine.info()` runs on the engine thread through the bridge, and only when
no other call is in flight, so the status bar never queues work behind a chat.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLabel, QProgressBar, QStatusBar, QWidget

from kvscope.ui.bridge import EngineBridge

INFO_INTERVAL_MS = 2000


class StatusBar(QStatusBar):
    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.info: dict[str, Any] = {}
        self.model_label = QLabel("no model")
        self.device_label = QLabel("")
        self.memory_label = QLabel("")
        self.busy_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(True)
        self.progress.hide()
        for w in (self.busy_label, self.progress, self.model_label, self.device_label, self.memory_label):
            self.addPermanentWidget(w)
        self._timer = QTimer(self)
        self._timer.setInterval(INFO_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)
        self._timer.start()

    def set_info(self, info: dict[str, Any]) -> None:
        self.info = info
        if "model" in info:
            self.model_label.setText(f"<b>{info['model']}</b> · {info.get('layers', '?')} layers")
            self.model_label.setToolTip(str(info.get("model_path", "")))
        blas = info.get("blas", "?")
        self.device_label.setText(f"{info.get('device', '?')} · {info.get('dtype', '?')} · BLAS {blas}")
        self.device_label.setToolTip(str(info.get("blas_note", "")))
        cache = info.get("cache_bytes", 0) / 2**20
        store = info.get("prefix_store_bytes", 0) / 2**20
        self.memory_label.setText(f"cache {cache:.1f} MiB · prefix store {store:.1f} MiB")

    def set_busy(self, busy: bool) -> None:
        self.busy_label.setText("● engine busy" if busy else "")

    def start_progress(self, text: str, total: int = 0) -> None:
        """Show the bar; `total == 0` is an indeterminate (busy) bar."""
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.progress.setFormat(f"{text} %p%" if total else text)
        self.progress.show()
        self.showMessage(text)

    def set_progress(self, done: int, total: int) -> None:
        if not self.progress.isVisible():
            return
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        if done >= total:
            self.finish_progress()

    def finish_progress(self) -> None:
        self.progress.hide()
        self.clearMessage()

    def _poll(self) -> None:
        if self.bridge.in_flight() == 0:
            self.bridge.call(lambda eng: eng.info(), self.set_info)
