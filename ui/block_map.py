"""BlockMap: the layers x blocks picture of one session's cache.

Promises:
- one pyqtgraph `ImageItem` with a fixed LUT (one colour per TokenState) and
  fixed levels, so a redraw is a single `setImage` of a uint8 view — no
  per-frame autolevels, no colour mixing of states;
- where a layer's KV heads hold different rows (head-wise compression), each
  layer row is split into one thin sub-row per KV head showing that head's
  occupancy (`set_states(..., head_state)`); y still reads as the layer;
- x is the block index, y the layer (layer 0 on top); ticks sit on cell
  centres and are whole numbers only, spaced so labels never overlap;
- the view follows the growing cache (the whole cache while it fits
  `FOLLOW_BLOCKS`, else the live end) until the person zooms or pans;
  `set_follow(True)` (the view's "follow" button) resumes it;
- hovering emits `hovered(layer, block)` (-1, -1 when leaving); the text is
  shown by the owner in a fixed pane, never as a tooltip that moves the map;
  a click emits `block_clicked(block, extend)`;
- drops (segments from another session, `.safetensors` files) are handed to
  `dropped(mime, block_boundary)`; a segment of this map's own session is
  refused unless Ctrl is held (`drop_refused(reason)`).

Knows nothing about the engine; it draws arrays it is given.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from pyqtgraph.GraphicsScene.mouseEvents import MouseClickEvent
from PySide6.QtCore import QEvent, QMimeData, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QDragEnterEvent, QDragLeaveEvent, QDragMoveEvent, QDropEvent
from PySide6.QtWidgets import QWidget

from kvscope.engine.blocks import N_STATES
from kvscope.ui.drag_format import accept_drop, accept_enter, accept_move
from kvscope.ui.palette import state_lut

__all__ = ["BlockMap", "IndexAxis"]
FOLLOW_BLOCKS = 160  # show the whole cache up to this many blocks, then the live end
MIN_BLOCKS_SHOWN = 8


def per_head_rows(block_state: np.ndarray, head_state: np.ndarray) -> np.ndarray:
    """`[layers * kv_heads, blocks]`: each layer's heads as consecutive rows."""
    n_layers, n_blocks = block_state.shape
    n_heads, known = head_state.shape[1], min(head_state.shape[2], n_blocks)
    out = np.repeat(block_state[:, None, :], n_heads, axis=1)
    out[:, :, :known] = head_state[:n_layers, :, :known]
    return out.reshape(n_layers * n_heads, n_blocks)


class IndexAxis(pg.AxisItem):
    """Whole-number ticks at cell centres (cell i spans [i, i + 1)), or at the integers
    themselves (`centre=False`: points at x = i, as a per-token line plot has)."""

    STEPS = (1, 2, 5)

    def __init__(self, orientation: str, px_per_label: int, centre: bool = True) -> None:
        super().__init__(orientation)
        self.px_per_label = px_per_label
        self.offset = 0.5 if centre else 0.0

    def tickValues(self, minVal: float, maxVal: float, size: float) -> list[tuple[float, list[float]]]:  # noqa: N802, N803
        lo_val, hi_val = sorted((minVal, maxVal))  # an inverted axis (layers) passes them reversed
        lo, hi = math.ceil(lo_val - self.offset), math.floor(hi_val - self.offset)
        if hi < lo or size <= 0:
            return []
        step = self.step_for(hi - lo + 1, size)
        first = lo + (-lo) % step
        return [(step, [i + self.offset for i in range(first, hi + 1, step)])]

    def step_for(self, n_cells: int, size: float) -> int:
        """Smallest 1-2-5 step that leaves `px_per_label` pixels per label."""
        fit = max(int(size // self.px_per_label), 1)
        scale = 1
        while True:
            for m in self.STEPS:
                if n_cells / (m * scale) <= fit:
                    return m * scale
            scale *= 10

    def tickStrings(self, values: list, scale: float, spacing: float) -> list[str]:  # noqa: N802
        return [str(int(round(v - self.offset))) for v in values]


class BlockMap(pg.PlotWidget):
    hovered = Signal(int, int)  # layer, block
    block_clicked = Signal(int, bool)  # block, shift held
    dropped = Signal(QMimeData, int)  # mime, block boundary the drop points at
    drop_refused = Signal(str)
    follow_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None, session: str = "") -> None:
        axes = {"bottom": IndexAxis("bottom", 44), "left": IndexAxis("left", 16)}
        super().__init__(parent, axisItems=axes)
        self.session = session  # drops of a span of this session need Ctrl (see drag_format)
        self.setBackground((24, 24, 28))
        self.image = pg.ImageItem(axisOrder="col-major")
        self.image.setLookupTable(state_lut())
        self.image.setLevels((0, N_STATES))
        self.addItem(self.image)
        vb = self.getViewBox()
        vb.invertY(True)
        vb.setMouseEnabled(x=True, y=True)
        vb.setLimits(xMin=-1, yMin=-0.5, minXRange=4, minYRange=1)
        vb.setRange(xRange=(0, MIN_BLOCKS_SHOWN), yRange=(0, 4), padding=0)  # an empty cache still reads as a map
        vb.sigRangeChangedManually.connect(lambda *_: self.set_follow(False))
        self.setLabel("bottom", "block")
        self.setLabel("left", "layer")
        self.hideButtons()
        self.selection = pg.LinearRegionItem(movable=False, brush=(255, 255, 255, 40), pen=pg.mkPen("w", width=1))
        self.selection.setZValue(10)
        self.selection.hide()
        self.addItem(self.selection)
        self.drop_line = pg.InfiniteLine(angle=90, pen=pg.mkPen((255, 220, 0), width=2))
        self.drop_line.hide()
        self.addItem(self.drop_line)
        self._shape = (0, 0)
        self._labels: tuple[str, ...] = ()
        self._hover = (-1, -1)
        self.follow = True
        self.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        self.setAcceptDrops(True)
        self.setMinimumHeight(110)

    # ------------------------------------------------------------ drawing
    def set_layer_labels(self, labels: tuple[str, ...]) -> None:
        """Name each layer row on the left axis (its kind: attention, window, state)."""
        if labels == self._labels:
            return  # a tick change re-lays out the axis: only when the model changes
        self._labels = labels
        ticks = [(i + 0.5, text) for i, text in enumerate(labels)]
        self.getAxis("left").setTicks([ticks, []] if ticks else None)

    def set_states(self, block_state: np.ndarray, head_state: np.ndarray | None = None) -> None:
        """Draw `[layers, blocks]` uint8 TokenStates; `head_state` (`[layers, kv_heads, blocks']`)
        splits each layer into per-head sub-rows (blocks past `blocks'` repeat the layer's state)."""
        n_layers, n_blocks = block_state.shape
        if n_blocks == 0:
            self.image.clear()
        else:
            rows = block_state if head_state is None else per_head_rows(block_state, head_state)
            self.image.setImage(rows.T, autoLevels=False, levels=(0, N_STATES))
            self.image.setRect(QRectF(0, 0, n_blocks, n_layers))  # sub-rows share their layer's unit
        if (n_layers, n_blocks) != self._shape:
            self._shape = (n_layers, n_blocks)
            self.getViewBox().setLimits(xMax=max(n_blocks + 1, MIN_BLOCKS_SHOWN), yMax=max(n_layers, 1) + 0.5)
            if self.follow:
                self._follow_end()

    def _follow_end(self) -> None:
        n_layers, n_blocks = self._shape
        hi = max(n_blocks, MIN_BLOCKS_SHOWN)
        lo = max(0, hi - FOLLOW_BLOCKS)
        self.getViewBox().setRange(xRange=(lo, hi), yRange=(0, max(n_layers, 1)), padding=0)

    def set_follow(self, on: bool) -> None:
        """Follow the live end of the cache (True) or keep the person's zoom (False)."""
        if on == self.follow:
            return
        self.follow = on
        if on:
            self._follow_end()
        self.follow_changed.emit(on)

    def visible_blocks(self) -> tuple[float, float]:
        (x0, x1), _ = self.getViewBox().viewRange()
        return x0, x1

    def set_selection(self, block_lo: float | None, block_hi: float | None) -> None:
        """Highlight blocks [lo, hi) (fractional: token spans inside a block)."""
        if block_lo is None or block_hi is None or block_hi <= block_lo:
            self.selection.hide()
            return
        self.selection.setRegion((block_lo, block_hi))
        self.selection.show()

    # ------------------------------------------------------------ mouse
    def cell_at(self, scene_pos: QPointF) -> tuple[int, int]:
        """(layer, block) under a scene position, or (-1, -1) outside the image."""
        p = self.getViewBox().mapSceneToView(scene_pos)
        layer, block = int(np.floor(p.y())), int(np.floor(p.x()))
        n_layers, n_blocks = self._shape
        if 0 <= layer < n_layers and 0 <= block < n_blocks:
            return layer, block
        return -1, -1

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        cell = self.cell_at(scene_pos)
        if cell != self._hover:
            self._hover = cell
            self.hovered.emit(*cell)

    def _on_mouse_clicked(self, ev: MouseClickEvent) -> None:
        if ev.button() != Qt.MouseButton.LeftButton:
            return
        layer, block = self.cell_at(ev.scenePos())
        if block >= 0:
            shift = bool(ev.modifiers() & Qt.KeyboardModifier.ShiftModifier)
            self.block_clicked.emit(block, shift)

    def leaveEvent(self, ev: QEvent) -> None:  # noqa: N802 - Qt override
        self._hover = (-1, -1)
        self.hovered.emit(-1, -1)
        super().leaveEvent(ev)

    # ------------------------------------------------------------ drops
    def _boundary_at(self, pos: QPointF) -> int:
        scene = self.mapToScene(pos.toPoint())
        x = self.getViewBox().mapSceneToView(scene).x()
        return int(np.clip(round(x), 0, self._shape[1]))

    def dragEnterEvent(self, ev: QDragEnterEvent) -> None:  # noqa: N802
        accept_enter(ev)

    def dragMoveEvent(self, ev: QDragMoveEvent) -> None:  # noqa: N802
        if accept_move(ev, self.session):
            self.drop_line.setValue(self._boundary_at(ev.position()))
            self.drop_line.show()
        else:
            self.drop_line.hide()

    def dragLeaveEvent(self, ev: QDragLeaveEvent) -> None:  # noqa: N802
        self.drop_line.hide()

    def dropEvent(self, ev: QDropEvent) -> None:  # noqa: N802
        self.drop_line.hide()
        why = accept_drop(ev, self.session)
        if why is not None:
            self.drop_refused.emit(why)
            return
        self.dropped.emit(ev.mimeData(), self._boundary_at(ev.position()))
