"""SessionView: one session's chat, block map and token strip (one tab of
the main window's session area, or one side of the compare view).

Promises:
- redraws only from the newest `SessionSnapshot` plus the tokens streamed
  since (`LiveTokens`), at most once per `refresh()` tick;
- `activated` is emitted only for a person's action in this view (a send,
  a selection made with mouse or keyboard, a click on the map, an edit):
  a redraw, a streamed token or a programmatic `select()` never emits it,
  so a streaming session cannot take the active role from another;
- every user edit goes through the bridge (`EngineBridge.call`), never to
  the engine directly; results and errors come back as signals;
- the block map, token strip and selection stay in step: a span selected in
  the strip is highlighted in the map, a block clicked in the map selects
  its tokens in the strip.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
    QWidgetAction,
)

from kvscope.engine.blocks import block_states
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
from kvscope.ui.block_info import describe_block
from kvscope.ui.block_map import BlockMap
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.live_tokens import LiveTokens
from kvscope.ui.message_edit import MessageEdit
from kvscope.ui.palette import reduce_states, state_legend
from kvscope.ui.span_actions import SpanActions
from kvscope.ui.status import ElidedLabel
from kvscope.ui.token_strip import TokenStrip

__all__ = ["SessionView", "reduce_states"]
HOVER_HINT = "Hover a block to inspect it; click it to select its tokens.\n "


def _shown(content: str) -> str:
    """Message text for the transcript: blank runs collapsed so answers stay visible."""
    body = content.strip()
    return body if body else f"({len(content)} whitespace characters)"


class SessionView(QFrame):
    activated = Signal(str)  # session id, on a person's action in this view
    selection_changed = Signal(str, int, int)  # session id, lo, hi
    turn_ended = Signal(str)  # session id: the chat call returned or failed
    notice = Signal(str)  # something the person should read (e.g. a refused drop)

    def __init__(self, bridge: EngineBridge, sid: SessionId, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge, self.sid, self.name = bridge, sid, name
        self.snapshot: SessionSnapshot | None = None
        self.live = LiveTokens()
        self._pending_chat: list[str] = []  # streamed text not yet in the chat box
        self.generating = False
        self._dirty = False
        self._last_turn = ""
        self._strip_at_end = True
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self._build(name)
        self.actions_ = SpanActions(bridge, sid, self, self)
        self._connect()

    @property
    def live_texts(self) -> list[str]:
        return self.live.texts

    # ------------------------------------------------------------ layout
    def _build(self, name: str) -> None:
        self.strip = TokenStrip(session=self.sid)
        self.strip_scroll = QScrollArea(widgetResizable=True)
        self.strip_scroll.setWidget(self.strip)
        self.strip_scroll.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        for w in (self._chat_box(), self._map_box(), self.strip_scroll):
            self.splitter.addWidget(w)
        self.splitter.setSizes([240, 220, 240])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(self._head(name))
        lay.addWidget(self.splitter, 1)

    def _head(self, name: str) -> QHBoxLayout:
        """Name, system prompt and the cache's figures, on one line."""
        self.title = QLabel(f"<b>{name}</b>")
        self.info = ElidedLabel("")
        self.info.setStyleSheet("color: #888")
        self.info.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.system_label = ElidedLabel("")
        self.system_label.setStyleSheet("color: #8a8; font-style: italic")
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addWidget(self.system_label, 1)
        head.addWidget(self.info, 2)
        return head

    def _chat_box(self) -> QWidget:
        """The transcript, the message box with Send and Stop, the sampling settings."""
        self.chat = QPlainTextEdit(readOnly=True)
        self.chat.setPlaceholderText("The conversation appears here.")
        self.prompt = MessageEdit()
        self.send_btn = QPushButton("Send")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        row.addWidget(self.send_btn, 0, Qt.AlignmentFlag.AlignBottom)
        row.addWidget(self.stop_btn, 0, Qt.AlignmentFlag.AlignBottom)
        box = QWidget()
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.chat, 1)
        lay.addLayout(row)
        lay.addLayout(self._sampling_row())
        return box

    def _map_box(self) -> QWidget:
        """The block map, its fixed inspector line, the legend and the follow button."""
        self.block_map = BlockMap(session=self.sid)
        self.follow_btn = QToolButton()
        self.follow_btn.setText("follow the end")
        self.follow_btn.setCheckable(True)
        self.follow_btn.setChecked(True)
        self.follow_btn.setToolTip("Keep the newest blocks in view (turns off when you zoom or pan the map)")
        self.follow_btn.toggled.connect(self.block_map.set_follow)
        self.block_map.follow_changed.connect(self.follow_btn.setChecked)
        self.hover_label = QLabel(HOVER_HINT)  # a fixed two-line inspector: hovering never moves the map
        self.hover_label.setStyleSheet("color: #bbb; font-family: monospace")
        self.hover_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.hover_label.setFixedHeight(2 * self.hover_label.fontMetrics().lineSpacing() + 4)
        self.hover_label.setTextFormat(Qt.TextFormat.PlainText)
        legend = QHBoxLayout()
        legend.addWidget(state_legend(), 1)
        legend.addWidget(self.follow_btn)
        box = QWidget()
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.block_map, 1)
        lay.addWidget(self.hover_label)
        lay.addLayout(legend)
        return box

    def _sampling_row(self) -> QHBoxLayout:
        """A one-button summary of the sampling settings; the settings open under it."""
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.0, decimals=2)
        self.top_p = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, value=1.0, decimals=2)
        self.max_tokens = QSpinBox(minimum=1, maximum=8192, value=128)
        self.seed = QSpinBox(minimum=-1, maximum=2**31 - 1, value=-1)
        self.seed.setSpecialValueText("random")
        form_box = QWidget()
        form = QFormLayout(form_box)
        for label, w, tip in (
            ("temperature", self.temperature, "0 = greedy (always the most likely token)"),
            ("top-p", self.top_p, "sample only from the smallest set of tokens with this much probability"),
            ("max tokens", self.max_tokens, "longest answer, in tokens"),
            ("seed", self.seed, "random seed of the sampler (random = a new one each turn)"),
        ):
            w.setToolTip(tip)
            form.addRow(label, w)
            w.valueChanged.connect(self._show_sampling)
        menu = QMenu(self)
        action = QWidgetAction(menu)
        action.setDefaultWidget(form_box)
        menu.addAction(action)
        self.sampling_btn = QToolButton(popupMode=QToolButton.ToolButtonPopupMode.InstantPopup)
        self.sampling_btn.setMenu(menu)
        self.sampling_btn.setToolTip("Sampling settings of this session's next turns")
        self._show_sampling()
        row = QHBoxLayout()
        row.addWidget(self.sampling_btn)
        row.addStretch(1)
        return row

    def _show_sampling(self) -> None:
        p = self.sampling()
        how = "greedy" if p.temperature == 0 else f"temperature {p.temperature:g} · top-p {p.top_p:g}"
        seed = "" if p.seed is None else f" · seed {p.seed}"
        self.sampling_btn.setText(f"sampling: {how}{seed} · max {p.max_tokens} tokens")

    def _connect(self) -> None:
        self.actions_.started.connect(lambda _op: self.activated.emit(self.sid))
        self.send_btn.clicked.connect(self._on_send)
        self.prompt.submitted.connect(lambda _text: self._on_send())
        self.stop_btn.clicked.connect(self._on_stop)
        self.block_map.hovered.connect(self._on_block_hovered)
        self.block_map.block_clicked.connect(self._on_block_clicked)
        self.block_map.dropped.connect(lambda mime, b: self.actions_.handle_drop(mime, b * self.block_size))
        self.strip.selection_changed.connect(self._on_user_selection)
        self.strip.dropped.connect(self.actions_.handle_drop)
        self.strip.menu_requested.connect(self.actions_.show_menu)
        self.strip.cursor_moved.connect(self._ensure_token_visible)
        bar = self.strip_scroll.verticalScrollBar()
        bar.valueChanged.connect(self._on_strip_scrolled)
        bar.rangeChanged.connect(self._on_strip_grew)
        self.strip.drop_refused.connect(self.notice)
        self.block_map.drop_refused.connect(self.notice)

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
        self.turn_ended.emit(self.sid)

    def _on_turn_failed(self, exc: BaseException) -> None:
        self._set_generating(False)
        self.chat.appendPlainText(f"[error] {exc}")
        self.live.clear()
        self._dirty = True
        self.bridge.want_snapshot(self.sid)
        self.turn_ended.emit(self.sid)

    # ------------------------------------------------------------ engine -> view
    def on_event(self, ev: Event) -> None:
        if isinstance(ev, TurnStarted):
            self.live.start_turn(ev.prompt_tokens)
            self._dirty = True
        elif isinstance(ev, TokenSampled):
            self.live.add(ev.token_id, ev.text)
            self._pending_chat.append(ev.text)
            self._dirty = True
        elif isinstance(ev, GenerationFinished):
            self._last_turn = f"last turn: TTFT {ev.ttft_ms:.0f} ms · {ev.decode_tps:.0f} tok/s · {ev.finish_reason}"
            self.bridge.want_snapshot(self.sid)
        elif isinstance(ev, (CacheChanged, SessionChanged)):
            self.bridge.want_snapshot(self.sid)

    def on_snapshot(self, snap: SessionSnapshot) -> None:
        first = self.snapshot is None
        self.snapshot = snap
        self.live.learn(snap)
        if not snap.generating:
            self.live.clear()
        self.name = snap.name
        self.title.setText(f"<b>{snap.name}</b>")
        self.title.setToolTip(f"session id {snap.session}")
        system = next((c for r, c in snap.messages if r == "system"), "")
        self.system_label.set_full_text(f"system: {system}" if system else "")
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
        """Redraw if anything changed since the last call; True if it drew. Never emits `activated`."""
        if self._pending_chat:  # one insert per frame, not one per token
            self.chat.moveCursor(QTextCursor.MoveOperation.End)
            self.chat.insertPlainText("".join(self._pending_chat))
            self._pending_chat.clear()
        if not self._dirty or self.snapshot is None:
            return False
        self._dirty = False
        snap = self.snapshot
        token_state, texts, positions = self.live.arrays(snap)
        self.block_map.set_states(block_states(token_state, snap.block_size), snap.head_block_state)
        self.block_map.set_layer_labels(snap.layer_labels)
        self.strip.set_tokens(texts, reduce_states(token_state), positions, snap.block_size)
        self._show_selection(*self.strip.selection)
        self.info.set_full_text(self.live.header(snap))
        self.info.setToolTip(f"{self.info.full_text}\n{self._last_turn}".strip())
        return True

    # ------------------------------------------------------------ selection and hover
    def selection(self) -> tuple[int, int]:
        return self.strip.selection

    def token_count(self) -> int:
        """Tokens shown (the cache's, plus those streamed since its last snapshot)."""
        return len(self.strip.texts)

    def run_action(self, key: str) -> None:
        """Run the edit action `key` (see `actions.EDIT_ACTIONS`) on this session's selection."""
        self.actions_.trigger(key)

    def select(self, lo: int, hi: int) -> None:
        """Select a span programmatically (does not make this view active)."""
        self.strip.set_selection(lo, hi, notify=False)
        self._show_selection(*self.strip.selection)
        self.selection_changed.emit(self.sid, *self.strip.selection)

    def _show_selection(self, lo: int, hi: int) -> None:
        bs = self.block_size
        self.block_map.set_selection(lo / bs if hi > lo else None, hi / bs if hi > lo else None)

    def _on_user_selection(self, lo: int, hi: int) -> None:
        self._show_selection(lo, hi)
        if hi > lo:
            self.activated.emit(self.sid)
        self.selection_changed.emit(self.sid, lo, hi)

    def _on_block_clicked(self, block: int, extend: bool) -> None:
        bs, n = self.block_size, len(self.strip.texts)
        lo, hi = block * bs, min((block + 1) * bs, n)
        if extend and self.strip.selection[1] > self.strip.selection[0]:
            lo, hi = min(lo, self.strip.selection[0]), max(hi, self.strip.selection[1])
        self.strip.set_selection(lo, hi)
        self._ensure_token_visible(lo)

    def _on_strip_scrolled(self, value: int) -> None:
        bar = self.strip_scroll.verticalScrollBar()
        self._strip_at_end = value >= bar.maximum() - self.strip.row_h

    def _on_strip_grew(self, _lo: int, hi: int) -> None:
        # Like the map, the strip keeps the live end in view unless the person scrolled away.
        if self._strip_at_end and self.block_map.follow:
            self.strip_scroll.verticalScrollBar().setValue(hi)

    def _ensure_token_visible(self, i: int) -> None:
        rect = self.strip.token_rect(i)
        self.strip_scroll.ensureVisible(rect.center().x(), rect.center().y(), rect.width(), self.strip.row_h)

    def _on_block_hovered(self, layer: int, block: int) -> None:
        text = self.describe_block(layer, block) if block >= 0 else ""
        self.hover_label.setText(text or HOVER_HINT)
        self.hover_label.setToolTip(text)

    def describe_block(self, layer: int, block: int) -> str:
        """Everything a person asks about one block in one layer."""
        return describe_block(self.snapshot, layer, block)
