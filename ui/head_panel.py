"""HeadPanel: the per-KV-head half of the Decisions tab.

Promises:
- left: the keep mask of one layer's KV heads (head × token, state colours)
  as the cache holds it now (`snapshot.head_state`); a layer whose heads
  share their rows shows them alike and says so; the layer is chosen with
  the spin box above it;
- right: the budgets of the last decision, layer × KV head, each cell
  labelled with its row count (`snapshot.head_budgets`); a per-layer
  decision shows its per-layer budgets in one column;
- it draws snapshots it is given and calls nothing in the engine.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSpinBox, QSplitter, QVBoxLayout, QWidget

from kvscope.engine.blocks import N_STATES, TokenState
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.block_map import IndexAxis
from kvscope.ui.palette import state_lut


class HeadPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.snapshot: SessionSnapshot | None = None
        self.layer = QSpinBox(minimum=0, maximum=0, prefix="layer ")
        self.layer.setToolTip("The layer whose KV heads the keep mask shows")
        self.layer.valueChanged.connect(lambda _v: self._draw_heads())
        self.caption = QLabel("")
        self.head_plot, self.head_img = _plot("KV head × token", "KV head", "token", cells_x=False)
        self.head_img.setLookupTable(state_lut())
        self.head_img.setLevels((0, N_STATES))
        self.budget_plot, self.budget_img = _plot("rows per KV head", "layer", "KV head")
        self.budget_plot.setMinimumWidth(240)
        self.budget_img.setColorMap(pg.colormap.get("viridis"))
        self._labels: list[pg.TextItem] = []
        top = QHBoxLayout()
        top.addWidget(self.layer)
        top.addWidget(self.caption, 1)
        split = QSplitter()
        split.addWidget(self.head_plot)
        split.addWidget(self.budget_plot)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addWidget(split, 1)

    def on_snapshot(self, snap: SessionSnapshot) -> None:
        self.snapshot = snap
        self.layer.setMaximum(max(snap.n_layers - 1, 0))
        self._draw_heads()
        self._draw_budgets()

    def _heads_of(self, layer: int) -> tuple[np.ndarray, bool]:
        """`[heads, tokens]` states of `layer` and whether its heads differ."""
        snap = self.snapshot
        assert snap is not None
        heads = snap.head_state[layer] if layer < len(snap.head_state) else None
        if heads is not None:
            return heads, True
        n_heads = len(snap.head_budgets[layer]) if snap.head_budgets else 1
        return np.repeat(snap.token_state[layer][None], max(n_heads, 1), axis=0), False

    def _draw_heads(self) -> None:
        snap = self.snapshot
        if snap is None or snap.n_layers == 0:
            return
        layer = min(self.layer.value(), snap.n_layers - 1)
        heads, differ = self._heads_of(layer)
        self.head_img.setImage(heads.T, autoLevels=False, levels=(0, N_STATES))
        self.head_plot.getViewBox().setRange(
            xRange=(0, max(heads.shape[1], 1)), yRange=(0, max(heads.shape[0], 1)), padding=0
        )
        kept = (heads != TokenState.EVICTED).sum(axis=1) if differ else None
        self.head_plot.setTitle(
            f"layer {layer}: KV head × token"
            + (
                f" · rows held per head {list(map(int, kept))}"
                if kept is not None
                else " · all heads hold the same rows"
            )
        )
        budgets = snap.layer_budgets
        self.caption.setText(
            ("per-layer budget " + ", ".join(map(str, budgets)) if budgets else "no decision yet")
            + (" · heads differ in this layer" if differ else "")
        )

    def _draw_budgets(self) -> None:
        snap = self.snapshot
        assert snap is not None
        for item in self._labels:
            self.budget_plot.removeItem(item)
        self._labels = []
        if snap.head_budgets:
            grid = np.asarray(snap.head_budgets, np.float32)
            self.budget_plot.setTitle("rows kept per KV head")
        elif snap.layer_budgets:
            grid = np.asarray(snap.layer_budgets, np.float32)[:, None]
            self.budget_plot.setTitle("rows kept per layer")
        else:
            self.budget_img.clear()
            self.budget_plot.setTitle("budgets: no decision yet")
            return
        self.budget_img.setImage(grid.T, autoLevels=True)
        self.budget_plot.getViewBox().setRange(xRange=(0, grid.shape[1]), yRange=(0, grid.shape[0]), padding=0)
        for (layer, head), value in np.ndenumerate(grid):
            label = pg.TextItem(str(int(value)), color=(255, 255, 255), anchor=(0.5, 0.5))
            label.setPos(head + 0.5, layer + 0.5)
            self.budget_plot.addItem(label)
            self._labels.append(label)


def _plot(title: str, left: str, bottom: str, cells_x: bool = True) -> tuple[pg.PlotWidget, pg.ImageItem]:
    axes = {"left": IndexAxis("left", 14)} | ({"bottom": IndexAxis("bottom", 30)} if cells_x else {})
    plot = pg.PlotWidget(title=title, axisItems=axes)
    plot.setBackground((24, 24, 28))
    img = pg.ImageItem(axisOrder="col-major")
    plot.addItem(img)
    plot.getViewBox().invertY(True)
    plot.setLabel("bottom", bottom)
    plot.setLabel("left", left)
    plot.setMinimumHeight(110)
    plot.getViewBox().setRange(xRange=(0, 64), yRange=(0, 4), padding=0)
    return plot, img
