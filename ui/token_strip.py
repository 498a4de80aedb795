"""TokenStrip: the text of the cache, one row per block, coloured by state.

    b0  | <|im_start|> system ⏎ You are ...        (row = block 0: tokens 0..15)
    b1  | ... masked tokens drawn grey, evicted red, spliced orchid ...

Promises:
- row i shows exactly block i, so the strip lines up with the block map's
  x axis (block index) and its selection maps 1:1 to block spans;
- press and drag selects a token span `[lo, hi)` (`selection_changed`,
  emitted only for a person's mouse or keyboard action); pressing inside
  the selection and moving past `QApplication.startDragDistance()` starts
  a Qt drag carrying `application/x-kvscope-segment` JSON `{session, lo,
  hi}`; a plain click inside the selection selects that token, never drags;
- the keyboard does what the mouse does: Left/Right move the cursor token,
  Up/Down a block, Home/End to the row's ends (Ctrl: the cache's ends),
  Shift extends the selection, Ctrl+A selects all, Escape clears; the
  strip takes focus with Tab or a click (`cursor_moved` scrolls to it);
- drops (segments, `.safetensors` files) emit `dropped(mime, at_token)`,
  `at` snapped to the block boundary nearest the cursor; a span dropped
  onto its own session is refused (`drop_refused(reason)`) unless Ctrl is
  held (the format and the checks: `drag_format.py`);
- paints only the visible rows, so a 100k-token cache scrolls smoothly.

Knows nothing about the engine.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QEvent, QMimeData, QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QContextMenuEvent,
    QDrag,
    QDragEnterEvent,
    QDragLeaveEvent,
    QDragMoveEvent,
    QDropEvent,
    QFont,
    QFontMetrics,
    QHelpEvent,
    QKeyEvent,
    QMouseEvent,
    QPainter,
    QPaintEvent,
)
from PySide6.QtWidgets import QApplication, QToolTip, QWidget

from kvscope.ui.drag_format import DraggedSegment, accept_drop, accept_enter, accept_move, encode_segment
from kvscope.ui.palette import state_colour, state_name

LABEL_W = 52
PAD = 3


def display_text(piece: str) -> str:
    """How a token piece is drawn: newlines and empty pieces made visible."""
    shown = piece.replace("\n", "⏎").replace("\t", "⇥")
    return shown if shown.strip() else (shown.replace(" ", "·") or "∅")


class TokenStrip(QWidget):
    selection_changed = Signal(int, int)  # lo, hi (hi == lo: cleared)
    dropped = Signal(QMimeData, int)  # mime, token index to insert at
    menu_requested = Signal(QPoint)  # global position
    token_hovered = Signal(int)
    cursor_moved = Signal(int)  # token index the keyboard cursor is on
    drop_refused = Signal(str)  # why a drop was refused

    def __init__(self, parent: QWidget | None = None, session: str = "") -> None:
        super().__init__(parent)
        font = QFont("DejaVu Sans Mono")
        font.setStyleHint(QFont.StyleHint.Monospace)
        font.setPointSize(9)
        self.setFont(font)
        self._fm = QFontMetrics(font)
        self.row_h = self._fm.height() + 2 * PAD
        self.session = session  # what a drag of the selection names as its source
        self.block_size = 16
        self.texts: tuple[str, ...] = ()
        self.states = np.zeros(0, np.uint8)
        self.positions = np.zeros(0, np.int64)
        self.selection = (0, 0)
        self._anchor: int | None = None
        self.cursor_token = 0  # keyboard cursor (token index)
        self.drags_started = 0
        self._press_pos: QPoint | None = None
        self._press_in_selection = False
        self._edges: dict[int, list[int]] = {}
        self._drop_row: int | None = None
        self.setMouseTracking(True)
        self.setAcceptDrops(True)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)

    # ------------------------------------------------------------ data
    def set_tokens(self, texts: tuple[str, ...], states: np.ndarray, positions: np.ndarray, block_size: int) -> None:
        """Show tokens with one TokenState each (already reduced over layers)."""
        first = self._first_changed(texts, states, block_size)
        if first is None:
            return
        text_first = self._first_text_changed(texts, block_size)
        self.texts, self.states, self.positions, self.block_size = texts, states, positions, block_size
        row0 = first // block_size
        # Token boxes depend on the text only: a state change (mask, evict) keeps them.
        text_row0 = self.n_rows if text_first is None else text_first // block_size
        for row in [r for r in self._edges if r >= text_row0]:
            del self._edges[row]
        lo, hi = self.selection
        self.selection = (min(lo, len(texts)), min(hi, len(texts)))
        width = max((self._row_edges(r)[-1] for r in range(text_row0, self.n_rows)), default=LABEL_W) + PAD
        if self.minimumHeight() != max(self.n_rows, 1) * self.row_h or width > self.minimumWidth():
            # Rows wider than the view scroll sideways instead of being cut off.
            self.setMinimumSize(max(width, self.minimumWidth()), max(self.n_rows, 1) * self.row_h)
            self.updateGeometry()
        # Only rows from the first changed token down are repainted: while a
        # turn streams, that is the last row or two.
        self.update(QRect(0, row0 * self.row_h, self.width(), self.height() - row0 * self.row_h))

    def _first_text_changed(self, texts: tuple[str, ...], block_size: int) -> int | None:
        """First token index whose text (or row) differs from what is drawn (None: same texts)."""
        if block_size != self.block_size:
            return 0
        n = min(len(texts), len(self.texts))
        if texts[:n] != self.texts[:n]:
            return next(i for i in range(n) if texts[i] != self.texts[i])
        return n if len(texts) != len(self.texts) else None

    def _first_changed(self, texts: tuple[str, ...], states: np.ndarray, block_size: int) -> int | None:
        """First token index whose text or state differs from what is drawn (None: nothing)."""
        first = self._first_text_changed(texts, block_size)
        n = min(len(texts), len(self.texts))
        if block_size != self.block_size or (first is not None and first < n):
            return first
        diff = np.nonzero(states[:n] != self.states[:n])[0]
        return int(diff[0]) if len(diff) else first

    @property
    def n_rows(self) -> int:
        return -(-len(self.texts) // self.block_size) if self.texts else 0

    def set_selection(self, lo: int, hi: int, notify: bool = True) -> None:
        lo, hi = max(0, min(lo, hi)), min(len(self.texts), max(lo, hi))
        if (lo, hi) == self.selection:
            return
        self.selection = (lo, hi)
        self.update()
        if notify:
            self.selection_changed.emit(lo, hi)

    def row_rect(self, row: int) -> QRect:
        return QRect(0, row * self.row_h, self.width(), self.row_h)

    def token_rect(self, i: int) -> QRect:
        """The box of token i (clamped to the tokens there are)."""
        if not self.texts:
            return QRect(0, 0, LABEL_W, self.row_h)
        row, col = divmod(max(0, min(i, len(self.texts) - 1)), self.block_size)
        xs = self._row_edges(row)
        return QRect(xs[col], row * self.row_h, xs[col + 1] - xs[col], self.row_h)

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(self.minimumWidth(), self.minimumHeight())

    # ------------------------------------------------------------ geometry
    def _row_edges(self, row: int) -> list[int]:
        """x of the left edge of each token of a row, plus the right edge."""
        if row not in self._edges:
            xs = [LABEL_W]
            lo = row * self.block_size
            for t in self.texts[lo : lo + self.block_size]:
                xs.append(xs[-1] + self._fm.horizontalAdvance(display_text(t)) + 2 * PAD)
            self._edges[row] = xs
        return self._edges[row]

    def token_at(self, pos: QPoint, clamp: bool = True) -> int:
        """Logical token index under `pos` (-1 if outside and not clamping)."""
        if not self.texts:
            return -1
        row = pos.y() // self.row_h
        if not 0 <= row < self.n_rows:
            return (0 if row < 0 else len(self.texts) - 1) if clamp else -1
        xs = self._row_edges(row)
        col = int(np.searchsorted(xs, pos.x(), side="right")) - 1
        if not 0 <= col < len(xs) - 1:
            if not clamp:
                return -1
            col = 0 if col < 0 else len(xs) - 2
        return row * self.block_size + col

    def boundary_at(self, pos: QPoint) -> int:
        """Block boundary (token index) nearest `pos`: top half of a row -> its start."""
        row = int(round(pos.y() / self.row_h))
        return int(np.clip(row * self.block_size, 0, len(self.texts)))

    # ------------------------------------------------------------ painting
    def paintEvent(self, ev: QPaintEvent) -> None:  # noqa: N802
        p = QPainter(self)
        p.fillRect(ev.rect(), QColor(30, 30, 34))
        first = max(0, ev.rect().top() // self.row_h)
        last = min(self.n_rows, ev.rect().bottom() // self.row_h + 1)
        lo, hi = self.selection
        for row in range(first, last):
            self._paint_row(p, row, lo, hi)
        if self._drop_row is not None:
            p.setPen(QColor(255, 220, 0))
            y = self._drop_row * self.row_h
            p.drawLine(0, y, self.width(), y)
            p.drawLine(0, y + 1, self.width(), y + 1)
        p.end()

    def _paint_row(self, p: QPainter, row: int, sel_lo: int, sel_hi: int) -> None:
        y, h = row * self.row_h, self.row_h
        p.setPen(QColor(140, 140, 150))
        p.drawText(QRect(4, y, LABEL_W - 8, h), Qt.AlignmentFlag.AlignVCenter, f"b{row}")
        xs = self._row_edges(row)
        base = row * self.block_size
        for j in range(len(xs) - 1):
            i = base + j
            box = QRect(xs[j], y + 1, xs[j + 1] - xs[j] - 1, h - 2)
            selected = sel_lo <= i < sel_hi
            p.fillRect(box, state_colour(int(self.states[i]), 255 if selected else 120))
            if selected:
                p.setPen(QColor(255, 255, 255))
                p.drawRect(box.adjusted(0, 0, -1, -1))
            p.setPen(QColor(255, 255, 255) if selected else QColor(225, 225, 230))
            p.drawText(box, Qt.AlignmentFlag.AlignCenter, display_text(self.texts[i]))
        p.setPen(QColor(60, 60, 68))
        p.drawLine(0, y + h - 1, self.width(), y + h - 1)

    # ------------------------------------------------------------ mouse
    def mousePressEvent(self, ev: QMouseEvent) -> None:  # noqa: N802
        if ev.button() != Qt.MouseButton.LeftButton or not self.texts:
            return super().mousePressEvent(ev)
        i = self.token_at(ev.position().toPoint())
        lo, hi = self.selection
        self._press_pos = ev.position().toPoint()
        self._press_in_selection = lo <= i < hi and not ev.modifiers() & Qt.KeyboardModifier.ShiftModifier
        if ev.modifiers() & Qt.KeyboardModifier.ShiftModifier and hi > lo:
            self._anchor = lo
            self.set_selection(lo, i + 1)
        elif not self._press_in_selection:
            self._anchor = i
            self.set_selection(i, i + 1, notify=False)
        self.cursor_token = i

    def mouseMoveEvent(self, ev: QMouseEvent) -> None:  # noqa: N802
        pos = ev.position().toPoint()
        if not ev.buttons() & Qt.MouseButton.LeftButton:
            self.token_hovered.emit(self.token_at(pos, clamp=False))
            return
        if self._press_in_selection and self._press_pos is not None:
            if (pos - self._press_pos).manhattanLength() >= QApplication.startDragDistance():
                self._press_in_selection = False
                self.start_drag()
            return
        if self._anchor is not None:
            i = self.token_at(pos)
            self.cursor_token = i
            self.set_selection(min(self._anchor, i), max(self._anchor, i) + 1, notify=False)

    def mouseReleaseEvent(self, ev: QMouseEvent) -> None:  # noqa: N802
        if ev.button() != Qt.MouseButton.LeftButton or self._press_pos is None:
            return super().mouseReleaseEvent(ev)
        if self._press_in_selection:  # a click inside the selection selects that token
            i = self.token_at(ev.position().toPoint())
            self.set_selection(i, i + 1, notify=False)
        self._anchor, self._press_pos, self._press_in_selection = None, None, False
        self.selection_changed.emit(*self.selection)

    # ------------------------------------------------------------ keyboard
    def keyPressEvent(self, ev: QKeyEvent) -> None:  # noqa: N802
        target = self._key_target(ev)
        if target is None:
            if ev.key() == Qt.Key.Key_Escape and self.selection[1] > self.selection[0]:
                self.set_selection(self.cursor_token, self.cursor_token)
                return
            if ev.key() == Qt.Key.Key_A and ev.modifiers() & Qt.KeyboardModifier.ControlModifier and self.texts:
                self.set_selection(0, len(self.texts))
                return
            return super().keyPressEvent(ev)
        lo, hi = self.selection
        if ev.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            anchor = lo if self.cursor_token >= hi - 1 and hi > lo else (hi - 1 if hi > lo else self.cursor_token)
            self.cursor_token = target
            self.set_selection(min(anchor, target), max(anchor, target) + 1)
        else:
            self.cursor_token = target
            self.set_selection(target, target + 1)
        self.cursor_moved.emit(self.cursor_token)

    def _key_target(self, ev: QKeyEvent) -> int | None:
        """The token a navigation key moves the cursor to (None: not a navigation key)."""
        n = len(self.texts)
        if not n:
            return None
        c, bs = min(self.cursor_token, n - 1), self.block_size
        ctrl = bool(ev.modifiers() & Qt.KeyboardModifier.ControlModifier)
        key = ev.key()  # an int: Qt.Key is an IntEnum, so .value keys match it
        moves = {
            Qt.Key.Key_Left.value: c - 1,
            Qt.Key.Key_Right.value: c + 1,
            Qt.Key.Key_Up.value: c - bs,
            Qt.Key.Key_Down.value: c + bs,
            Qt.Key.Key_PageUp.value: c - 8 * bs,
            Qt.Key.Key_PageDown.value: c + 8 * bs,
            Qt.Key.Key_Home.value: 0 if ctrl else c - c % bs,
            Qt.Key.Key_End.value: n - 1 if ctrl else min(c - c % bs + bs - 1, n - 1),
        }
        if key not in moves:
            return None
        return max(0, min(n - 1, moves[key]))

    def contextMenuEvent(self, ev: QContextMenuEvent) -> None:  # noqa: N802
        self.menu_requested.emit(ev.globalPos())

    def event(self, ev: QEvent) -> bool:
        if ev.type() == QEvent.Type.ToolTip and isinstance(ev, QHelpEvent):
            i = self.token_at(ev.pos(), clamp=False)
            if i >= 0:
                QToolTip.showText(ev.globalPos(), self.describe(i), self)
            else:
                QToolTip.hideText()
            return True
        return super().event(ev)

    def describe(self, i: int) -> str:
        return (
            f"token {i} (block {i // self.block_size})  {self.texts[i]!r}\n"
            f"position {int(self.positions[i]) if i < len(self.positions) else '?'}  "
            f"state {state_name(int(self.states[i]))}"
        )

    # ------------------------------------------------------------ drag and drop
    def segment_mime(self) -> QMimeData:
        """What dragging the selection carries (see `drag_format`)."""
        lo, hi = self.selection
        return encode_segment(DraggedSegment(self.session, lo, hi), "".join(self.texts[lo:hi]))

    def start_drag(self) -> Qt.DropAction:
        if self.selection[1] <= self.selection[0]:
            return Qt.DropAction.IgnoreAction
        self.drags_started += 1
        drag = QDrag(self)
        drag.setMimeData(self.segment_mime())
        return drag.exec(Qt.DropAction.CopyAction)

    def dragEnterEvent(self, ev: QDragEnterEvent) -> None:  # noqa: N802
        accept_enter(ev)  # even a segment of this session: Ctrl may still be pressed on the way

    def dragMoveEvent(self, ev: QDragMoveEvent) -> None:  # noqa: N802
        taken = accept_move(ev, self.session)
        self._drop_row = self.boundary_at(ev.position().toPoint()) // self.block_size if taken else None
        self.update()

    def dragLeaveEvent(self, ev: QDragLeaveEvent) -> None:  # noqa: N802
        self._drop_row = None
        self.update()

    def dropEvent(self, ev: QDropEvent) -> None:  # noqa: N802
        self._drop_row = None
        self.update()
        why = accept_drop(ev, self.session)
        if why is not None:
            self.drop_refused.emit(why)
            return
        self.dropped.emit(ev.mimeData(), self.boundary_at(ev.position().toPoint()))
