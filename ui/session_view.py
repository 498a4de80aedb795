"""SessionView: one session's chat, block map and token strip, side by side
with other sessions in the main window's splitter.

Promises:
- redraws only from the newest `SessionSnapshot` plus the tokens streamed
  since (drawn as computed rows), at most once per `refresh()` tick;
- every user edit goes through the bridge (`EngineBridge.call`), never to
  the engine directly; results and errors come back as signals;
- the block map, token strip and selection stay in step: a span selected in
  the strip is highlighted in the map, a block clicked in the map selects
  its tokens in the strip.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from kvscope.engine.blocks import N_STATES, TokenState, block_states
from kvscope.engine.events import (
    CacheChanged,
    Event,
    GenerationFinished,
    SessionChanged,
    SessionId,
    TokenSampled,
    TurnStarted,
)
from kvscope.engine.generation import SamplingParams
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.block_map import BlockMap
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.palette import state_legend, state_name
from kvscope.ui.span_actions import SpanActions
from kvscope.ui.token_strip import TokenStrip


def _shown(content: str) -> str:
    """Message text for the transcript: blank runs collapsed so answers stay visible."""
    body = content.strip()
    return body if body else f"({len(content)} whitespace characters)"


def reduce_states(token_state: np.ndarray) -> np.ndarray:
    """Per token, the state most layers agree on: `[layers, tokens]` -> `[tokens]`."""
    if token_state.shape[1] == 0:
        return np.zeros(0, np.uint8)
    counts = np.stack([(token_state == s).sum(axis=0) for s in range(N_STATES)])
    return counts.argmax(axis=0).astype(np.uint8)


class SessionView(QFrame):
    activated = Signal(str)  # session id, when the user interacts with this view

    def __init__(self, bridge: EngineBridge, sid: SessionId, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge, self.sid = bridge, sid
        self.snapshot: SessionSnapshot | None = None
        self.live_texts: list[str] = []  # streamed since the snapshot
        self._pending_chat: list[str] = []  # streamed text not yet in the chat box
        self.generating = False
        self._dirty = False
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self._build(name)
        self.actions_ = SpanActions(self)
        self._connect()

    # ------------------------------------------------------------ layout
    def _build(self, name: str) -> None:
        self.title = QLabel(f"<b>{name}</b>")
        self.info = QLabel("")
        self.info.setStyleSheet("color: #888")
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addStretch(1)
        head.addWidget(self.info)
        self.chat = QPlainTextEdit(readOnly=True)
        self.chat.setPlaceholderText("The conversation appears here.")
        self.prompt = QLineEdit(placeholderText="Message… (Enter to send)")
        self.send_btn = QPushButton("Send")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        row.addWidget(self.send_btn)
        row.addWidget(self.stop_btn)
        self.block_map = BlockMap()
        self.hover_label = QLabel(" ")
        self.hover_label.setStyleSheet("color: #bbb; font-family: monospace")
        self.hover_label.setWordWrap(True)
        self.strip = TokenStrip()
        self.strip.session = self.sid
        self.strip_scroll = QScrollArea(widgetResizable=True)
        self.strip_scroll.setWidget(self.strip)
        chat_box = QWidget()
        cl = QVBoxLayout(chat_box)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(self.chat, 1)
        cl.addLayout(row)
        cl.addLayout(self._sampling_row())
        map_box = QWidget()
        ml = QVBoxLayout(map_box)
        ml.setContentsMargins(0, 0, 0, 0)
        ml.addWidget(self.block_map, 1)
        ml.addWidget(self.hover_label)
        ml.addWidget(state_legend())
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        for w in (chat_box, map_box, self.strip_scroll):
            self.splitter.addWidget(w)
        self.splitter.setSizes([260, 200, 260])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(head)
        lay.addWidget(self.splitter, 1)

    def _sampling_row(self) -> QHBoxLayout:
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.0, decimals=2)
        self.top_p = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, value=1.0, decimals=2)
        self.max_tokens = QSpinBox(minimum=1, maximum=8192, value=128)
        self.seed = QSpinBox(minimum=-1, maximum=2**31 - 1, value=-1, specialValueText="random")
        row = QHBoxLayout()
        for label, w in (
            ("temp", self.temperature),
            ("top-p", self.top_p),
            ("max", self.max_tokens),
            ("seed", self.seed),
        ):
            row.addWidget(QLabel(label))
            row.addWidget(w)
        row.addStretch(1)
        return row

    def _connect(self) -> None:
        self.send_btn.clicked.connect(self._on_send)
        self.prompt.returnPressed.connect(self._on_send)
        self.stop_btn.clicked.connect(self._on_stop)
        self.block_map.hovered.connect(self._on_block_hovered)
        self.block_map.block_clicked.connect(self._on_block_clicked)
        self.block_map.dropped.connect(lambda mime, b: self.actions_.handle_drop(mime, b * self.block_size))
        self.strip.selection_changed.connect(self._on_selection_changed)
        self.strip.dropped.connect(self.actions_.handle_drop)
        self.strip.menu_requested.connect(self.actions_.show_menu)

    # ------------------------------------------------------------ chat
    def sampling(self) -> SamplingParams:
        seed = self.seed.value()
        return SamplingParams(
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            max_tokens=self.max_tokens.value(),
            seed=None if seed < 0 else seed,
        )

    def send(self, text: str) -> int:
        """Start a chat turn; returns the bridge ticket."""
        sid, params = self.sid, self.sampling()
        self.chat.appendPlainText(f"\nuser: {text}\nassistant: ")
        self._set_generating(True)
        return self.bridge.call(lambda eng: eng.chat(sid, text, params), self._on_turn_done, self._on_turn_failed)

    def _on_send(self) -> None:
        text = self.prompt.text().strip()
        if text and not self.generating:
            self.prompt.clear()
            self.activated.emit(self.sid)
            self.send(text)

    def _on_stop(self) -> None:
        self.bridge.cancel(self.sid)

    def _set_generating(self, on: bool) -> None:
        self.generating = on
        self.send_btn.setEnabled(not on)
        self.stop_btn.setEnabled(on)

    def _on_turn_done(self, result: object) -> None:
        self._set_generating(False)
        self.bridge.want_snapshot(self.sid)

    def _on_turn_failed(self, exc: BaseException) -> None:
        self._set_generating(False)
        self.chat.appendPlainText(f"[error] {exc}")
        self.live_texts.clear()
        self.bridge.want_snapshot(self.sid)

    # ------------------------------------------------------------ engine -> view
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, TurnStarted):
            self.live_texts.clear()
        elif isinstance(ev, TokenSampled):
            self.live_texts.append(ev.text)
            self._pending_chat.append(ev.text)
            self._dirty = True
        elif isinstance(ev, GenerationFinished):
            self.info.setText(f"TTFT {ev.ttft_ms:.0f} ms · {ev.decode_tps:.0f} tok/s · {ev.finish_reason}")
            self.bridge.want_snapshot(self.sid)
        elif isinstance(ev, (CacheChanged, SessionChanged)):
            self.bridge.want_snapshot(self.sid)

    def on_snapshot(self, snap: SessionSnapshot) -> None:
        first = self.snapshot is None
        self.snapshot = snap
        if not snap.generating:
            self.live_texts.clear()
        self.title.setText(f"<b>{snap.name}</b> <span style='color:#888'>({snap.session})</span>")
        if not self.generating and (first or not snap.generating):
            self._show_transcript(snap)
        self._dirty = True

    def _show_transcript(self, snap: SessionSnapshot) -> None:
        self._pending_chat.clear()
        text = "\n".join(f"{role}: {_shown(content)}" for role, content in snap.messages)
        if text != self.chat.toPlainText().strip():
            self.chat.setPlainText(text)
            self.chat.moveCursor(QTextCursor.MoveOperation.End)

    @property
    def block_size(self) -> int:
        return self.snapshot.block_size if self.snapshot else 16

    def refresh(self) -> bool:
        """Redraw if anything changed since the last call; True if it drew."""
        if self._pending_chat:  # one insert per frame, not one per token
            self.chat.moveCursor(QTextCursor.MoveOperation.End)
            self.chat.insertPlainText("".join(self._pending_chat))
            self._pending_chat.clear()
        if not self._dirty or self.snapshot is None:
            return False
        self._dirty = False
        snap = self.snapshot
        token_state, texts, positions = self._live_arrays(snap)
        self.block_map.set_states(block_states(token_state, snap.block_size))
        self.block_map.set_layer_labels(snap.layer_labels)
        self.strip.set_tokens(texts, reduce_states(token_state), positions, snap.block_size)
        self._on_selection_changed(*self.strip.selection)
        n = len(texts)
        self.info.setText(
            f"{n} tokens · {-(-n // snap.block_size)} blocks · {snap.nbytes / 1024:.0f} KiB · next pos {snap.offset}"
        )
        return True

    def _live_arrays(self, snap: SessionSnapshot) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
        """The snapshot plus streamed tokens (computed rows at the next positions)."""
        k = len(self.live_texts)
        if not k:
            return snap.token_state, snap.token_text, snap.positions
        extra = np.full((snap.n_layers, k), TokenState.COMPUTED, np.uint8)
        start = int(snap.positions[-1]) + 1 if snap.n_tokens else 0
        return (
            np.concatenate([snap.token_state, extra], axis=1),
            snap.token_text + tuple(self.live_texts),
            np.concatenate([snap.positions, np.arange(start, start + k)]),
        )

    # ------------------------------------------------------------ selection and hover
    def selection(self) -> tuple[int, int]:
        return self.strip.selection

    def select(self, lo: int, hi: int) -> None:
        self.strip.set_selection(lo, hi)

    def _on_selection_changed(self, lo: int, hi: int) -> None:
        bs = self.block_size
        self.block_map.set_selection(lo / bs if hi > lo else None, hi / bs if hi > lo else None)
        if hi > lo:
            self.activated.emit(self.sid)

    def _on_block_clicked(self, block: int, extend: bool) -> None:
        bs, n = self.block_size, len(self.strip.texts)
        lo, hi = block * bs, min((block + 1) * bs, n)
        if extend and self.strip.selection[1] > self.strip.selection[0]:
            lo, hi = min(lo, self.strip.selection[0]), max(hi, self.strip.selection[1])
        self.strip.set_selection(lo, hi)
        self.strip_scroll.ensureVisible(0, block * self.strip.row_h, 0, self.strip.row_h * 2)

    def _on_block_hovered(self, layer: int, block: int) -> None:
        text = self.describe_block(layer, block) if block >= 0 else ""
        self.hover_label.setText(text.replace("\n", "  ·  ") or " ")
        self.block_map.show_hover_text(text)

    def describe_block(self, layer: int, block: int) -> str:
        """Everything a person asks about one block in one layer."""
        snap = self.snapshot
        if snap is None or block >= snap.n_blocks:
            return ""
        lo, hi = snap.block_span(block)
        states = snap.token_state[layer, lo:hi]
        stored = snap.token_state != TokenState.EVICTED
        per_row = snap.nbytes / max(int(stored.sum()), 1)
        h = snap.block_hashes[block]
        shared = ", ".join(snap.block_sessions[block]) or "—"
        score = "—" if snap.scores is None else f"{float(np.mean(snap.scores[layer, lo:hi])):.4g}"
        text = "".join(snap.token_text[lo:hi]).replace("\n", "⏎")
        counts = ", ".join(f"{state_name(s)} {int((states == s).sum())}" for s in np.unique(states))
        return (
            f"block {block} · layer {layer} · tokens [{lo}, {hi}) · positions {int(snap.positions[lo])}–{int(snap.positions[hi - 1])}\n"
            f"{counts} · {per_row * int(stored[:, lo:hi].sum()) / 1024:.1f} KiB · hash {h or '— (partial/edited)'}\n"
            f"shared by {shared} · score {score}\n"
            + (f"{snap.layer_notes[layer]}\n" if layer < len(snap.layer_notes) else "")
            + f"“{text[:160]}”"
        )
