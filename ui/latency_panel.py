"""LatencyPanel: latency and memory of every session on shared plots.

Promises:
- per-token decode ms and cache bytes over time, one curve per session in a
  fixed colour, so sessions compare on one plot; open sessions never share
  a colour (a closed session's colour is free again) and a closed session
  leaves the legends;
- a table of turns: TTFT, decode tok/s, cached vs prefilled tokens;
- curves are fed from events into growing numpy buffers and redrawn with
  `setData` at most once per `refresh()` (peak downsampling, clip to view).
"""

from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QHBoxLayout, QSplitter, QTableWidget, QTableWidgetItem, QWidget

from kvscope.engine.events import Event, GenerationFinished, SessionClosed, SessionCreated, TokenSampled
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.block_map import IndexAxis

SESSION_COLOURS = [(90, 170, 255), (255, 150, 60), (120, 220, 120), (240, 90, 200), (240, 230, 90), (160, 140, 255)]


class _Series:
    """A growing (x, y) buffer with amortised O(1) append."""

    def __init__(self) -> None:
        self.x = np.zeros(256)
        self.y = np.zeros(256)
        self.n = 0

    def append(self, x: float, y: float) -> None:
        if self.n == len(self.x):
            self.x = np.concatenate([self.x, np.zeros_like(self.x)])
            self.y = np.concatenate([self.y, np.zeros_like(self.y)])
        self.x[self.n], self.y[self.n] = x, y
        self.n += 1


class LatencyPanel(QWidget):
    COLUMNS = ("session", "turn", "TTFT ms", "tok/s", "cached", "prefilled", "tokens", "finish")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._t0 = time.perf_counter()
        self.decode_ms: dict[str, _Series] = {}
        self.cache_mib: dict[str, _Series] = {}
        self._curves: dict[tuple[str, str], pg.PlotDataItem] = {}
        self._turns: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self.colours: dict[str, tuple[int, int, int]] = {}
        self._dirty: set[tuple[str, str]] = set()
        # token indices: whole numbers, spaced so two-digit labels never run together
        self.token_plot = _plot("decode ms per token", "token", "ms", IndexAxis("bottom", 30, centre=False))
        self.bytes_plot = _plot("cache memory", "time (s)", "KiB")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setStretchLastSection(True)
        split = QSplitter()
        for w in (self.token_plot, self.bytes_plot, self.table):
            split.addWidget(w)
        split.setSizes([360, 360, 560])
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)

    def _curve(self, kind: str, sid: str) -> pg.PlotDataItem:
        key = (kind, sid)
        if key not in self._curves:
            colour = self.colour_of(sid)
            plot = self.token_plot if kind == "ms" else self.bytes_plot
            symbol = None if kind == "ms" else "o"
            curve = plot.plot(
                pen=pg.mkPen(colour, width=1.5),
                name=self._names.get(sid, sid),
                symbol=symbol,
                symbolSize=5,
                symbolBrush=colour,
            )
            curve.setDownsampling(auto=True, method="peak")
            curve.setClipToView(True)
            self._curves[key] = curve
        return self._curves[key]

    def colour_of(self, sid: str) -> tuple[int, int, int]:
        """The session's colour: the first one no open session uses (cycling past the palette)."""
        if sid not in self.colours:
            used = list(self.colours.values())
            free = [c for c in SESSION_COLOURS if c not in used]
            self.colours[sid] = free[0] if free else _extra_colour(len(used))
        return self.colours[sid]

    def legend_names(self, kind: str = "ms") -> list[str]:
        plot = self.token_plot if kind == "ms" else self.bytes_plot
        return [label.text for _, label in plot.plotItem.legend.items]

    # ------------------------------------------------------------ inputs
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, SessionCreated):
            self._names[ev.session] = ev.name
        elif isinstance(ev, TokenSampled) and ev.index > 0:
            s = self.decode_ms.setdefault(ev.session, _Series())
            s.append(s.n, ev.step_ms)
            self._dirty.add(("ms", ev.session))
        elif isinstance(ev, GenerationFinished):
            self._add_turn(ev)
        elif isinstance(ev, SessionClosed):
            self.decode_ms.pop(ev.session, None)
            self.cache_mib.pop(ev.session, None)
            self.colours.pop(ev.session, None)
            self._names.pop(ev.session, None)
            for kind, plot in (("ms", self.token_plot), ("mib", self.bytes_plot)):
                curve = self._curves.pop((kind, ev.session), None)
                if curve is not None:
                    plot.plotItem.legend.removeItem(curve)
                    plot.removeItem(curve)

    def on_snapshot(self, snap: SessionSnapshot) -> None:
        if self._names.get(snap.session) != snap.name:
            self._names[snap.session] = snap.name
            self._rename(snap.session)
        s = self.cache_mib.setdefault(snap.session, _Series())
        mib = snap.nbytes / 1024  # KiB
        if s.n and s.y[s.n - 1] == mib:  # unchanged: no new point
            return
        s.append(time.perf_counter() - self._t0, mib)
        self._dirty.add(("mib", snap.session))

    def _add_turn(self, ev: GenerationFinished) -> None:
        self._turns[ev.session] = self._turns.get(ev.session, 0) + 1
        values = (
            self._names.get(ev.session, ev.session),
            self._turns[ev.session],
            f"{ev.ttft_ms:.1f}",
            f"{ev.decode_tps:.1f}",
            ev.cached_tokens,
            ev.prefilled_tokens,
            ev.n_tokens,
            ev.finish_reason,
        )
        row = self.table.rowCount()
        self.table.insertRow(row)
        for col, v in enumerate(values):
            self.table.setItem(row, col, QTableWidgetItem(str(v)))
        self.table.resizeColumnsToContents()
        self.table.scrollToBottom()

    # ------------------------------------------------------------ drawing
    def refresh(self) -> bool:
        if not self._dirty:
            return False
        for kind, sid in self._dirty:
            s = (self.decode_ms if kind == "ms" else self.cache_mib).get(sid)
            if s is not None:
                self._curve(kind, sid).setData(s.x[: s.n], s.y[: s.n])
        self._dirty.clear()
        return True

    def _rename(self, sid: str) -> None:
        for kind, plot in (("ms", self.token_plot), ("mib", self.bytes_plot)):
            curve = self._curves.get((kind, sid))
            if curve is not None:
                plot.plotItem.legend.removeItem(curve)
                plot.plotItem.legend.addItem(curve, self._names[sid])


def _extra_colour(i: int) -> tuple[int, int, int]:
    """Colours past the palette: evenly spread hues, so they stay apart."""
    from PySide6.QtGui import QColor

    c = QColor.fromHsv(int(i * 137.5) % 360, 170, 240)
    return (c.red(), c.green(), c.blue())


def _plot(title: str, x: str, y: str, x_axis: pg.AxisItem | None = None) -> pg.PlotWidget:
    plot = pg.PlotWidget(title=title, axisItems={"bottom": x_axis} if x_axis is not None else None)
    plot.setLabel("bottom", x)
    plot.setLabel("left", y)
    plot.addLegend(offset=(-10, 10), colCount=2, labelTextSize="8pt")  # many sessions: two columns
    plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setMinimumHeight(140)
    return plot
