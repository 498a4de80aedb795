"""Colours of the token/block states, shared by the block map, the token strip
and the legend, so one state always has one colour.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QLabel, QSizePolicy, QWidget

from kvscope.engine.blocks import N_STATES, TokenState

STATE_RGB: dict[TokenState, tuple[int, int, int]] = {
    TokenState.COMPUTED: (70, 130, 180),  # steel blue
    TokenState.SHARED: (60, 179, 113),  # green: prefix hit
    TokenState.MASKED: (150, 150, 150),  # grey: kept, invisible
    TokenState.EVICTED: (200, 60, 60),  # red: dropped
    TokenState.SPLICED: (186, 85, 211),  # orchid: came from elsewhere
    TokenState.QUANTIZED: (230, 160, 40),  # amber
    TokenState.ERRATUM: (240, 220, 60),  # yellow: appended correction
    TokenState.EMPTY: (28, 28, 32),  # background
}


def state_lut() -> np.ndarray:
    """`[N_STATES, 3]` uint8 lookup table indexed by TokenState (levels 0..N_STATES)."""
    return np.array([STATE_RGB[TokenState(i)] for i in range(N_STATES)], np.uint8)


def state_colour(state: int, alpha: int = 255) -> QColor:
    r, g, b = STATE_RGB[TokenState(state)]
    return QColor(r, g, b, alpha)


def state_name(state: int) -> str:
    return TokenState(state).name.lower()


def reduce_states(token_state: np.ndarray) -> np.ndarray:
    """Per token, the state most layers agree on: `[layers, tokens]` -> `[tokens]`."""
    if token_state.shape[1] == 0:
        return np.zeros(0, np.uint8)
    counts = np.stack([(token_state == s).sum(axis=0) for s in range(N_STATES)])
    return counts.argmax(axis=0).astype(np.uint8)


def state_legend() -> QWidget:
    """Coloured swatches naming each state (EMPTY left out); wraps when narrow."""
    items = " ".join(
        f"<span style='color:{state_colour(state).name()}'>■</span>&nbsp;{state_name(state)}"
        for state in TokenState
        if state != TokenState.EMPTY
    )
    label = QLabel(f"<span style='color:#888'>{items}</span>")
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label
