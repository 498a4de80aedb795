"""StatusBar: model, device, memory, a progress bar, and errors that stay.

Promises:
- the model / device / memory figures come from `engine.info()`, run on the
  engine thread through the bridge when an engine event says they changed
  (a session opened or closed, a turn finished, an edit, the prefix store
  cleared, an error) — never on a timer, so an idle window asks nothing;
  while one `info()` is in flight, later events ask for one more, not many;
- `start_progress` shows the bar; `finish_progress` always fills it to
  100 %, records that (`last_finished_percent`) and hides it — the window
  calls it when a load or turn ends in any way (finished, cancelled,
  failed);
- an error stays on screen (red, with the whole text in its tooltip) until
  the person dismisses it or a newer error replaces it; plain messages
  come and go as usual;
- every label may shrink (text elided), so the bar never makes the window
  wider than the screen.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QResizeEvent
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QSizePolicy, QStatusBar, QToolButton, QWidget

from kvscope.engine.events import (
    AllBlocksCleared,
    CacheChanged,
    EngineError,
    Event,
    GenerationFinished,
    SessionClosed,
    SessionCreated,
)
from kvscope.ui.bridge import EngineBridge

# Events after which the model, memory or store figures may read differently.
FIGURES_CHANGED = (SessionCreated, SessionClosed, GenerationFinished, CacheChanged, AllBlocksCleared, EngineError)


class ElidedLabel(QLabel):
    """A one-line label that elides its text to its width (whole text in the tooltip)."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.full_text = ""
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(40)
        self.set_full_text(text)

    def set_full_text(self, text: str) -> None:
        self.full_text = text
        self.setToolTip(text)
        self._elide()

    def resizeEvent(self, ev: QResizeEvent) -> None:  # noqa: N802
        super().resizeEvent(ev)
        self._elide()

    def _elide(self) -> None:
        one_line = " ".join(self.full_text.split())
        self.setText(self.fontMetrics().elidedText(one_line, Qt.TextElideMode.ElideRight, max(self.width(), 40)))


class StatusBar(QStatusBar):
    progress_finished = Signal(int)  # percent shown when the bar closed (always 100)

    def __init__(self, bridge: EngineBridge, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.info: dict[str, Any] = {}
        self.error_box = QWidget()
        self.error_label = ElidedLabel()
        self.error_label.setStyleSheet("color: #ff6b6b; font-weight: bold")
        self.dismiss_btn = QToolButton()
        self.dismiss_btn.setText("✕")
        self.dismiss_btn.setToolTip("Dismiss this error")
        self.dismiss_btn.clicked.connect(self.clear_error)
        row = QHBoxLayout(self.error_box)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.error_label, 1)
        row.addWidget(self.dismiss_btn)
        self.error_box.hide()
        self.addPermanentWidget(self.error_box, 2)  # permanent: a passing message never hides it
        self.busy_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(200)
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.model_label = ElidedLabel("no model")
        self.model_label.setMinimumWidth(90)
        self.device_label = ElidedLabel("")
        self.device_label.setMinimumWidth(90)
        for w, stretch in ((self.busy_label, 0), (self.progress, 0), (self.model_label, 1), (self.device_label, 1)):
            self.addPermanentWidget(w, stretch)
        self.last_finished_percent: int | None = None
        self.info_requests = 0  # engine.info() calls made (tests count them)
        self._info_in_flight = False
        self._info_stale = False
        bridge.events.connect(self._on_events)
        self.request_info()

    # ------------------------------------------------------------ figures
    def set_info(self, info: dict[str, Any]) -> None:
        self.info = info
        if "model" in info:
            self.model_label.set_full_text(f"{info['model']} · {info.get('layers', '?')} layers")
            self.model_label.setToolTip(f"{info['model']}\n{info.get('model_path', '')}")
        else:
            self.model_label.set_full_text("no model")
        cache = info.get("cache_bytes", 0) / 2**20
        store = info.get("prefix_store_bytes", 0) / 2**20
        self.device_label.set_full_text(
            f"{info.get('device', '?')} · {info.get('dtype', '?')} · BLAS {info.get('blas', '?')} · "
            f"cache {cache:.1f} MiB · prefix store {store:.1f} MiB"
        )

    def model_text(self) -> str:
        return self.model_label.full_text

    def set_busy(self, text: str) -> None:
        self.busy_label.setText(f"● {text}" if text else "")

    # ------------------------------------------------------------ errors
    def show_error(self, text: str) -> None:
        """Show an error until dismissed or replaced."""
        self.error_label.set_full_text(text)
        self.error_box.show()

    def clear_error(self) -> None:
        self.error_label.set_full_text("")
        self.error_box.hide()

    def error_text(self) -> str:
        return self.error_label.full_text if self.error_box.isVisibleTo(self) else ""

    # ------------------------------------------------------------ progress
    def start_progress(self, text: str, total: int = 0) -> None:
        """Show the bar; `total == 0` is an indeterminate (busy) bar."""
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.progress.setFormat(f"{text} %p%" if total else text)
        self.progress.show()

    def set_progress(self, done: int, total: int) -> None:
        if self.progress.isHidden():
            return
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(done, max(total, 1)))

    def finish_progress(self) -> None:
        """Fill the bar to 100 % and close it (no-op when no bar is shown)."""
        if self.progress.isHidden():
            return
        total = max(self.progress.maximum(), 1)
        self.progress.setRange(0, total)
        self.progress.setValue(total)
        self.last_finished_percent = round(100 * self.progress.value() / total)
        self.progress.hide()
        self.progress_finished.emit(self.last_finished_percent)

    # ------------------------------------------------------------ engine -> bar
    def request_info(self) -> None:
        """Ask the engine for fresh figures (one call at a time; a request meanwhile asks once more)."""
        if self._info_in_flight:
            self._info_stale = True
            return
        self._info_in_flight, self._info_stale = True, False
        self.info_requests += 1
        self.bridge.call(lambda eng: eng.info(), self._on_info, self._on_info_failed)

    def _on_info(self, info: dict[str, Any]) -> None:
        self._info_in_flight = False
        self.set_info(info)
        if self._info_stale:
            self.request_info()

    def _on_info_failed(self, _exc: BaseException) -> None:
        self._info_in_flight = False  # the bridge reports the error; the next event asks again

    def _on_events(self, batch: list[Event]) -> None:
        if any(isinstance(ev, FIGURES_CHANGED) for ev in batch):
            self.request_info()
