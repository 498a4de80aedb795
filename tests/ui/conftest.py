"""Fixtures for the window tests: a bridge on a tiny model and a main window."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from kvscope.engine import EngineConfig
from kvscope.ui.bridge import EngineBridge
from kvscope.ui.main_window import MainWindow

WAIT_MS = 20_000


@pytest.fixture
def bridge(qtbot, llama_dir: Path) -> Iterator[EngineBridge]:
    b = EngineBridge()
    b.worker.call(lambda e: e.load(str(llama_dir)), timeout=60)
    yield b
    b.shutdown()


def open_window(qtbot, model_dir: Path, config: EngineConfig | None = None) -> MainWindow:
    win = MainWindow(EngineBridge(config))
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    win.load_model(str(model_dir))
    qtbot.waitUntil(lambda: win.active_view() is not None and win.active_view().snapshot is not None, timeout=WAIT_MS)
    return win


def close_window(win: MainWindow) -> None:
    win.close()
    win.bridge.shutdown()


@pytest.fixture
def window(qtbot, llama_dir: Path) -> Iterator[MainWindow]:
    win = open_window(qtbot, llama_dir)
    yield win
    close_window(win)


def settle(qtbot, win: MainWindow) -> None:
    """Wait until the engine is idle and the newest snapshots are drawn."""
    qtbot.waitUntil(lambda: win.bridge.in_flight() == 0, timeout=WAIT_MS)
    qtbot.wait(2 * 33 + 20)  # one snapshot tick + one redraw tick
    qtbot.waitUntil(lambda: win.bridge.in_flight() == 0, timeout=WAIT_MS)
    win.redraw()


def engine_call(win: MainWindow, fn: Callable) -> object:
    """Run `fn(engine)` on the engine thread and wait (tests check engine state)."""
    return win.bridge.worker.call(fn, timeout=60)


def chat(qtbot, win: MainWindow, view, text: str, max_tokens: int = 12) -> None:
    view.max_tokens.setValue(max_tokens)
    view.send(text)
    qtbot.waitUntil(lambda: not view.generating, timeout=WAIT_MS)
    settle(qtbot, win)


def strip_point(strip, i: int) -> QPoint:
    """Centre of token i's box in the token strip."""
    return strip.token_rect(i).center()


def drag_select(qtbot, strip, lo: int, hi: int) -> None:
    qtbot.mousePress(strip, Qt.MouseButton.LeftButton, pos=strip_point(strip, lo))
    qtbot.mouseMove(strip, strip_point(strip, hi - 1))
    qtbot.mouseRelease(strip, Qt.MouseButton.LeftButton, pos=strip_point(strip, hi - 1))


def send_drop(target, mime, pos: QPoint, modifiers=Qt.KeyboardModifier.NoModifier) -> bool:
    """Deliver drag-enter, drag-move and drop events; True if the drop was accepted."""
    actions = Qt.DropAction.CopyAction
    for cls in (QDragEnterEvent, QDragMoveEvent):
        QApplication.sendEvent(target, cls(pos, actions, mime, Qt.MouseButton.LeftButton, modifiers))
    drop = QDropEvent(QPointF(pos), actions, mime, Qt.MouseButton.LeftButton, modifiers)
    QApplication.sendEvent(target, drop)
    return drop.isAccepted()
