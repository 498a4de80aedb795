"""AttachView: a serving engine's prefix cache in the window, read-only, live.

    [engine tcp://…: 12 blocks (384 tokens) in 3 chains; stored … | stream …]
    [ chain x block map: green = shared by several chains, blue = one   ]
    [ hovered/clicked block: hash, parent, media, reuses, its text      ]
    [ stored/s, removed/s over time ]   [ prompt -> cached prefix here  ]

Promises:
- the view only reads: a 4 Hz timer has one `ChainGrid` built from the
  `AttachClient` on a worker thread (plain arrays, under the client's lock)
  and draws the finished one, so the receive thread is never held up by
  drawing and the Qt thread neither builds grids nor waits on a socket;
- the tokenizer (optional) loads on a worker thread; until then token ids are
  shown as numbers;
- `attach_engine(window)` (File -> Attach to engine…) asks for the endpoints
  and docks one view per engine; `AttachWindow` holds several side by side
  for `kvscope attach --window`, with the blocks they hold in common.

Knows nothing about the local engine.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
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
    QPlainTextEdit,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from kvscope.attach import AttachClient
from kvscope.attach.chain_grid import ChainGrid, build_grid
from kvscope.attach.fleet import common_content, prompt_tokens
from kvscope.attach.metrics import MetricsPoller
from kvscope.ui.block_map import BlockMap

REFRESH_MS = 250
RATE_SAMPLES = 240  # one minute at 4 Hz
RATE_EVERY = 4  # redraw the rate plots every 4th tick (1 Hz)


def load_tokenizer_async(folder: str | None) -> Future[Any] | None:
    if not folder:
        return None

    def load() -> Any:
        from mlx_lm.utils import load_tokenizer

        return load_tokenizer(Path(folder))

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-tokenizer")
    fut = pool.submit(load)
    pool.shutdown(wait=False)
    return fut


class AttachView(QWidget):
    def __init__(self, client: AttachClient, tokenizer: Future[Any] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        self._tok_future = tokenizer
        self.tokenizer: Any = None
        self.grid: ChainGrid | None = None
        self._last_applied = -1
        self.applied = 0  # batches the drawn grid holds (applied to the cache, not only received)
        self._rates: deque[tuple[int, int]] = deque(maxlen=RATE_SAMPLES)
        self._selected = (-1, -1)
        self._shape: tuple[int, ...] = (0, 0)
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-attach-grid")
        self._building: Future[tuple[int, ChainGrid]] | None = None
        self._build()
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.refresh()

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        self.header = QLabel()
        self.header.setWordWrap(True)
        self.header.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.header)
        split = QSplitter(Qt.Orientation.Vertical)
        self.map = BlockMap()
        self.map.setAcceptDrops(False)  # read-only: nothing can be dropped into a remote engine
        self.map.setLabel("left", "chain")
        self.map.hovered.connect(self._on_hovered)
        self.map.scene().sigMouseClicked.connect(self._on_clicked)
        split.addWidget(self.map)
        self.detail = QPlainTextEdit()
        self.detail.setReadOnly(True)
        self.detail.setPlaceholderText("hover or click a block: its hash, parent, media and tokens")
        split.addWidget(self.detail)
        self.rates = pg.PlotWidget()
        self.rates.setBackground((24, 24, 28))
        self.rates.addLegend(offset=(5, 5))
        self.rates.setLabel("left", "blocks / s")
        self.stored_curve = self.rates.plot(pen=pg.mkPen((60, 179, 113), width=2), name="stored")
        self.removed_curve = self.rates.plot(pen=pg.mkPen((200, 60, 60), width=2), name="removed")
        self.rates.setXRange(0, RATE_SAMPLES * REFRESH_MS / 1000.0, padding=0)
        self.rates.setLabel("bottom", "s")
        self.rates.setMinimumHeight(90)
        split.addWidget(self.rates)
        self.hits = pg.PlotWidget()  # the server's /metrics, when given: hit rate per scrape interval
        self.hits.setBackground((24, 24, 28))
        self.hits.setLabel("left", "prefix hit %")
        self.hits.setYRange(0, 100)
        self.hit_curve = self.hits.plot(pen=pg.mkPen((240, 220, 60), width=2), symbol="o", symbolSize=4)
        self.hits.setVisible(self.client.metrics is not None)
        self.hits.setMinimumHeight(80)
        split.addWidget(self.hits)
        split.setSizes([380, 110, 100, 100])
        lay.addWidget(split, 1)
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText(
            'a user message, or a JSON list of {"role", "content"}: how much of it would this engine find cached?'
        )
        self.prompt.textChanged.connect(self._update_prompt_hit)
        self.prompt_hit = QLabel()
        lay.addWidget(self.prompt)
        lay.addWidget(self.prompt_hit)

    # ------------------------------------------------------------ refresh
    def refresh(self) -> None:
        """Pull the newest grid from the client and redraw if anything arrived."""
        if self._tok_future is not None and self._tok_future.done():
            fut, self._tok_future = self._tok_future, None
            if fut.exception() is None:
                self.tokenizer = fut.result()
                self._last_applied = -1  # redraw the text with words
            else:
                self.detail.setPlainText(f"tokenizer not loaded: {fut.exception()}")
        stored, removed, applied = self.client.read(
            lambda c, s: (c.counters.blocks_stored, c.counters.blocks_removed, self.client.batches)
        )
        self._rates.append((stored, removed))
        self._draw_rates()
        self._draw_hit_rate()
        if self._building is None and (applied != self._last_applied or self.grid is None or self.client.error):
            # the grid is built off the Qt thread; this tick or a later one draws it
            self._building = self._builder.submit(
                lambda: self.client.read(lambda c, s: (self.client.batches, build_grid(c, s)))
            )
        if self._building is None or not self._building.done():
            return
        fut, self._building = self._building, None
        applied, grid = fut.result()
        self.grid = grid
        err = f"<br><b style='color:#e66'>error: {self.client.error}</b>" if self.client.error else ""
        left = f" ({grid.rows_left_out} more chains not drawn)" if grid.rows_left_out else ""
        hot = " · ".join(f"{h} (reused {r}×, {k} branches)" for h, r, k in grid.hot)
        hot = f"<br><span style='color:#e6a028'>hot: {hot}</span>" if hot else ""
        s = grid.stream
        metrics = f"<br>{self.client.metrics.summary()}" if self.client.metrics is not None else ""
        self.header.setText(
            f"<b>{self.client.name}</b> (read-only){left}<br>{grid.summary}<br>"
            f"<span style='color:#888'>seq {s['last_seq']} · batches {s['applied']} · replayed {s['replayed']} · "
            f"gaps {s['gaps']} · lost {s['lost']} · restarts {s['restarts']} · bad messages {s['bad_messages']}</span>"
            f"{hot}{metrics}{err}"
        )
        self._last_applied = self.applied = applied
        self.map.set_states(grid.states)
        if grid.states.shape != self._shape:  # show every chain whole until the shape changes again
            self._shape = grid.states.shape
            rows, cols = self._shape
            self.map.getViewBox().setRange(xRange=(0, max(cols, 4)), yRange=(0, max(rows, 1)), padding=0.02)
        self._show_cell(*self._selected)
        self._update_prompt_hit()

    def _draw_rates(self) -> None:
        # once a second, on a fixed time axis: re-laying out pyqtgraph's axes costs more than the data
        if len(self._rates) < 2 or len(self._rates) % RATE_EVERY:
            return
        arr = np.array(self._rates, np.float64)
        per_s = np.diff(arr, axis=0) * (1000.0 / REFRESH_MS)
        x = np.arange(len(per_s)) * REFRESH_MS / 1000.0
        self.stored_curve.setData(x, np.maximum(per_s[:, 0], 0))
        self.removed_curve.setData(x, np.maximum(per_s[:, 1], 0))

    def _draw_hit_rate(self) -> None:
        poller = self.client.metrics
        if poller is None or len(self._rates) % RATE_EVERY:
            return
        samples = poller.samples()
        if len(samples) < 2:
            return
        t = np.array([x.t for x in samples])
        q = np.diff([x.queries for x in samples])
        h = np.diff([x.hits for x in samples])
        rate = np.where(q > 0, 100.0 * h / np.maximum(q, 1e-9), np.nan)
        self.hit_curve.setData(t[1:] - t[0], rate, connect="finite")

    # ------------------------------------------------------------ details
    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return str(self.tokenizer.decode(ids))

    def _on_hovered(self, row: int, col: int) -> None:
        if row >= 0:
            self._show_cell(row, col)
        elif self._selected != (-1, -1):
            self._show_cell(*self._selected)

    def _on_clicked(self, ev: Any) -> None:
        if ev.button() != Qt.MouseButton.LeftButton:
            return
        self._selected = self.map.cell_at(ev.scenePos())
        self._show_cell(*self._selected)

    def _show_cell(self, row: int, col: int) -> None:
        cell = self.grid.cell(row, col) if self.grid is not None else None
        if cell is None:
            return
        before = self.grid.chain_tokens(row, col - 1) if self.grid is not None and col > 0 else []
        text = (
            f"block {col} of chain {row}: {cell.block_hash}  parent {cell.parent or '(root)'}\n"
            f"media {', '.join(cell.media)} · {'shared by several chains' if cell.shared else 'in one chain'} · "
            f"reused {cell.reuses}x · "
            f"{len(cell.token_ids)} tokens\n\n"
            f"…{self._decode(before[-48:])}⟦{self._decode(list(cell.token_ids))}⟧"
        )
        self.detail.setPlainText(text)

    def _update_prompt_hit(self) -> None:
        text = self.prompt.text()
        if not text:
            self.prompt_hit.setText("")
            return
        if self.tokenizer is None:
            self.prompt_hit.setText("give a tokenizer (the served model's folder) to match prompts")
            return
        ids = prompt_tokens(self.tokenizer, text)
        n = self.client.read(lambda c, _s: c.match(ids))
        self.prompt_hit.setText(f"cached prefix here: {n} of {len(ids)} tokens")

    def close_client(self) -> None:
        self.timer.stop()
        self._builder.shutdown(wait=True)
        self.client.close()


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
        """The client and its view; ValueError (shown by the caller) for a bad endpoint."""
        url = self.metrics.text().strip()
        poller = MetricsPoller(url) if url else None  # a bad URL fails before any socket opens
        try:
            client = AttachClient(
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
    dock.destroyed.connect(lambda *_: view.client.close())
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

    def __init__(self, clients: list[AttachClient], tokenizer: Future[Any] | None = None) -> None:
        super().__init__()
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
        if len(self.views) > 1:
            n = len(common_content([v.client for v in self.views]))
            self.common.setText(f"blocks held by all {len(self.views)} engines (same tokens from the root): {n}")

    def closeEvent(self, ev: Any) -> None:  # noqa: N802 - Qt override
        for v in self.views:
            v.close_client()
        super().closeEvent(ev)
