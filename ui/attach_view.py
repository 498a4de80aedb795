"""AttachView: a serving engine's prefix cache in the window, read-only, live.

    [engine tcp://…: 12 blocks (384 tokens) in 3 chains; stored … | stream …]
    [ chain x block map: green = shared by several chains, blue = one   ]
    [ hovered/clicked block: hash, parent, media, reuses, its text      ]
    [ stored/s, removed/s over time ]   [ prompt -> cached prefix here  ]

Promises:
- the view only reads, and the Qt thread never touches the cache: it polls
  the client's lock-free `progress` (4 Hz) and, when something changed,
  asks its one worker thread for a `ChainGrid` (built under the client's
  lock, or in the attach process for an `AttachProcess`); the finished grid
  comes back as a signal and is drawn whole: one image, one header, at most
  one grid in flight, so a frame's work is bounded whatever the stream does;
  a grid that took t to build waits t / BUILD_SHARE (at most a second)
  before the next, so the cache spends at most a quarter of its time on
  the view;
- prompt matches ("how much of this prompt would this engine find cached?")
  are tokenized and matched on the same worker and answered by a signal;
- evictions flash: blocks removed in the last `flash_s` seconds are drawn
  red where they were, and the header counts them; the view keeps
  redrawing while any flash, so they go when their time is up;
- the tokenizer (optional) loads on a worker thread; until then token ids are
  shown as numbers.
The dialog, the dock and the several-engines window are in `attach_window`.

Knows nothing about the local engine.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QDockWidget,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from kvscope.attach import AttachClient
from kvscope.attach.chain_grid import FLASH_S, ChainGrid, cell_detail, view_grid
from kvscope.attach.fleet import cached_prefix, prompt_tokens
from kvscope.attach.process_client import AttachProcess
from kvscope.ui.block_map import BlockMap

REFRESH_MS = 250
RATE_SAMPLES = 240  # one minute at 4 Hz
RATE_EVERY = 4  # redraw the rate plots every 4th tick (1 Hz)
HEADER_LINES = 7  # name, summary, stream, evicted, hot, metrics (wrapped), error
BUILD_SHARE = 0.25  # the longest share of the time the cache spends building grids for the view
BUILD_WAIT_MAX_S = 1.0  # but a grid at least once a second (on a loaded machine a build's wall time balloons)


def emit_safely(signal: Any, value: Any) -> None:
    """Emit from the worker; after the view is gone there is no one to tell."""
    try:
        signal.emit(value)
    except RuntimeError:
        pass


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
    _grid_built = Signal(object)  # a ChainGrid or the exception, from the worker
    _prompt_matched = Signal(object)  # (text, cached tokens, prompt tokens, error), from the worker
    _cell_detailed = Signal(object)  # (request, CellInfo | None | exception), from the worker

    def __init__(
        self,
        client: AttachClient | AttachProcess,
        tokenizer: Future[Any] | None = None,
        parent: QWidget | None = None,
        flash_s: float = FLASH_S,
    ) -> None:
        super().__init__(parent)
        self.client = client
        self.flash_s = flash_s
        self._tok_future = tokenizer
        self.tokenizer: Any = None
        self.grid: ChainGrid | None = None
        self._last_applied = -1
        self.applied = 0  # batches the drawn grid holds (applied to the cache, not only received)
        self.grids_drawn = 0
        self._rates: deque[tuple[int, int]] = deque(maxlen=RATE_SAMPLES)
        self._selected = (-1, -1)
        self._shape: tuple[int, ...] = (0, 0)
        # one worker does everything that reads the cache (grids, prompt matches): the Qt thread never
        # takes the client's lock, so a busy stream cannot stall it
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-attach-view")
        self._building = False
        self._next_build_at = 0.0
        self._detail_busy = False
        self._detail_want: tuple[int, int, int, tuple[str, ...], int] = (-1, -1, 0, (), 0)
        self._grid_built.connect(self._draw_grid)
        self._prompt_matched.connect(self._show_prompt_hit)
        self._cell_detailed.connect(self._show_detail)
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
        self.header.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        # a fixed height: text that changes 4 times a second must not re-lay out the plots below it
        # (each re-layout made pyqtgraph re-measure and repaint every axis)
        self.header.setFixedHeight(self.header.fontMetrics().lineSpacing() * HEADER_LINES + 4)
        self.header.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        lay.addWidget(self.header)
        split = QSplitter(Qt.Orientation.Vertical)
        self.map = BlockMap()
        self.map.setAcceptDrops(False)  # read-only: nothing can be dropped into a remote engine
        self.map.setLabel("left", "chain")
        self.map.hovered.connect(self._on_hovered)
        self.map.scene().sigMouseClicked.connect(self._on_clicked)
        # thin background-coloured lines between chains and blocks: rows of one colour stay rows
        self.cell_lines = pg.PlotCurveItem(pen=pg.mkPen((24, 24, 28), width=1), connect="pairs")
        self.cell_lines.setZValue(5)
        self.map.addItem(self.cell_lines)
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
        """Sample the rates; ask the worker for a new grid when something changed (one at a time)."""
        if self._tok_future is not None and self._tok_future.done():
            fut, self._tok_future = self._tok_future, None
            if fut.exception() is None:
                self.tokenizer = fut.result()
                self._show_cell(*self._selected)  # words instead of ids
                self._update_prompt_hit()
            else:
                self.detail.setPlainText(f"tokenizer not loaded: {fut.exception()}")
        p = self.client.progress  # lock-free
        self._rates.append((p.blocks_stored, p.blocks_removed))
        self._draw_rates()
        self._draw_hit_rate()
        g = self.grid
        flashing = g is not None and (g.n_flashing > 0 or g.flash_left_out > 0)  # redraw until the red is gone
        changed = p.batches != self._last_applied or g is None or self.client.error or flashing
        if changed and not self._building and time.monotonic() >= self._next_build_at:
            self._building = True
            self._worker.submit(self._build_grid)

    def _build_grid(self) -> None:  # on the worker thread
        t0 = time.monotonic()
        try:
            result: Any = self.client.read(partial(view_grid, flash_s=self.flash_s))
        except Exception as exc:  # noqa: BLE001 - shown in the header
            result = exc
        # building holds the cache's lock (the receive thread waits): at most BUILD_SHARE of the time
        took = time.monotonic() - t0
        self._next_build_at = t0 + min(took / BUILD_SHARE, BUILD_WAIT_MAX_S)
        emit_safely(self._grid_built, result)

    def _draw_grid(self, result: Any) -> None:
        """The Qt thread's whole share of a frame: one image, one header, the hovered block."""
        self._building = False
        if isinstance(result, Exception):
            self.header.setText(f"<b style='color:#e66'>could not draw the cache: {result}</b>")
            return
        grid = result
        applied = grid.batches
        self.grid = grid
        self.grids_drawn += 1
        self.header.setText(self._header_html(grid))
        self._last_applied = self.applied = applied
        self.map.set_states(grid.states)
        if grid.states.shape != self._shape:  # show every chain whole until the shape changes again
            self._shape = grid.states.shape
            rows, cols = self._shape
            self.map.getViewBox().setRange(xRange=(0, max(cols, 4)), yRange=(0, max(rows, 1)), padding=0.02)
            self._draw_cell_lines(rows, cols)
        self._show_cell(*self._selected)
        self._update_prompt_hit()

    def _draw_cell_lines(self, rows: int, cols: int) -> None:
        """Segments (pairs of points) on every row and block boundary inside the grid: one item, on shape changes."""
        ys = np.arange(1, rows, dtype=np.float64)
        xs = np.arange(1, cols, dtype=np.float64)
        x = np.concatenate([np.tile([0.0, float(cols)], len(ys)), np.repeat(xs, 2)])
        y = np.concatenate([np.repeat(ys, 2), np.tile([0.0, float(rows)], len(xs))])
        self.cell_lines.setData(x, y)

    def _header_html(self, grid: ChainGrid) -> str:
        left = []
        if grid.rows_left_out:
            left.append(f"{grid.rows_left_out} more chains not drawn")
        if grid.cols_left_out:
            left.append(f"{grid.cols_left_out} blocks past column {grid.states.shape[1]} not drawn")
        caps = f" ({'; '.join(left)})" if left else ""
        flash = ""
        if grid.n_flashing or grid.flash_left_out:
            more = f", {grid.flash_left_out} more not drawn" if grid.flash_left_out else ""
            flash = (
                f"<br><span style='color:#e66'>evicted: {grid.n_flashing} blocks removed in the last "
                f"{self.flash_s:g} s, shown in red{more}</span>"
            )
        hot = " · ".join(f"{h} (reused {r}×, {k} branches)" for h, r, k in grid.hot)
        hot = f"<br><span style='color:#e6a028'>hot: {hot}</span>" if hot else ""
        s = grid.stream
        metrics = f"<br>{self.client.metrics.summary()}" if self.client.metrics is not None else ""
        err = f"<br><b style='color:#e66'>error: {self.client.error}</b>" if self.client.error else ""
        return (
            f"<b>{self.client.name}</b> (read-only){caps}<br>{grid.summary}<br>"
            f"<span style='color:#888'>seq {s['last_seq']} · batches {s['applied']} · replayed {s['replayed']} · "
            f"gaps {s['gaps']} · lost {s['lost']} · restarts {s['restarts']} · bad messages {s['bad_messages']}</span>"
            f"{flash}{hot}{metrics}{err}"
        )

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
        """Ask the worker what block (row, col) of the drawn grid holds; the newest ask wins."""
        g = self.grid
        if g is None or not g.has_cell(row, col):
            return
        self._detail_want = (row, col, g.row_groups[row], g.rows[row][: col + 1], int(g.states[row, col]))
        if not self._detail_busy:
            self._detail_busy = True
            self._worker.submit(self._fetch_detail, self._detail_want)

    def _fetch_detail(self, want: tuple[int, int, int, tuple[str, ...], int]) -> None:  # on the worker thread
        _row, _col, group, hashes, state = want
        try:
            info: Any = self.client.read(partial(cell_detail, group=group, hashes=hashes, state=state))
        except Exception as exc:  # noqa: BLE001 - shown in the pane
            info = exc
        emit_safely(self._cell_detailed, (want, info))

    def _show_detail(self, result: tuple[Any, Any]) -> None:
        want, info = result
        self._detail_busy = False
        if want != self._detail_want:  # the pointer moved on meanwhile: ask for where it is now
            self._detail_busy = True
            self._worker.submit(self._fetch_detail, self._detail_want)
            return
        row, col, _group, hashes, _state = want
        where = f"block {col} of chain {row}: {hashes[-1]}"
        if isinstance(info, Exception) or info is None:
            self.detail.setPlainText(f"{where}\n{info or 'no longer known to the cache'}")
            return
        self.detail.setPlainText(
            f"{where}  parent {info.parent or '(root)'}\n"
            f"{'EVICTED just now from ' if info.evicted else 'media '}{', '.join(info.media) or '-'} · "
            f"{'shared by several chains' if info.shared else 'in one chain'} · "
            f"reused {info.reuses}x · {len(info.token_ids)} tokens\n\n"
            f"…{self._decode(list(info.before[-48:]))}⟦{self._decode(list(info.token_ids))}⟧"
        )

    def _update_prompt_hit(self) -> None:
        """Ask the worker how much of the prompt this engine holds; the answer arrives as a signal."""
        text = self.prompt.text()
        if not text:
            self.prompt_hit.setText("")
            return
        if self.tokenizer is None:
            self.prompt_hit.setText("give a tokenizer (the served model's folder) to match prompts")
            return
        self._worker.submit(self._match_prompt, text, self.tokenizer)

    def _match_prompt(self, text: str, tokenizer: Any) -> None:  # on the worker thread
        try:
            ids = prompt_tokens(tokenizer, text)
            n = self.client.read(partial(cached_prefix, token_ids=tuple(ids)))
            result = (text, n, len(ids), "")
        except Exception as exc:  # noqa: BLE001 - a tokenizer that fails on this text: said, not raised
            result = (text, 0, 0, f"{type(exc).__name__}: {exc}")
        emit_safely(self._prompt_matched, result)

    def _show_prompt_hit(self, result: tuple[str, int, int, str]) -> None:
        text, n, total, err = result
        if text != self.prompt.text():
            return  # the answer to an earlier prompt
        self.prompt_hit.setText(
            f"cannot match this prompt: {err}" if err else f"cached prefix here: {n} of {total} tokens"
        )

    def close_client(self, close: bool = True) -> None:
        """Stop drawing; close the client too unless its owner reads it afterwards (`close=False`)."""
        self.timer.stop()
        self._worker.shutdown(wait=True)
        if close:
            self.client.close()


def attach_engine(window: QMainWindow, dialog: Any = None) -> QDockWidget | None:
    """File -> Attach to engine… (kvscope.ui.attach_window.attach_engine; main_window imports it from here)."""
    from kvscope.ui.attach_window import attach_engine as ask_and_dock

    return ask_and_dock(window, dialog)
