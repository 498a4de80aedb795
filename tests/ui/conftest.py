"""Fixtures for the window tests: a bridge on a tiny model and a main window."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvscope.ui.bridge import EngineBridge
from kvscope.ui.main_window import MainWindow

WAIT_MS = 20_000


@pytest.fixture
def bridge(qtbot, llama_dir: Path) -> Iterator[EngineBridge]:
    b = EngineBridge()
    b.worker.call(lambda e: e.load(str(llama_dir)), timeout=60)
    yield b
    b.shutdown()


@pytest.fixture
def window(qtbot, llama_dir: Path) -> Iterator[MainWindow]:
    b = EngineBridge()
    win = MainWindow(b)
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    win.load_model(str(llama_dir))
    qtbot.waitUntil(lambda: win.active_view() is not None and win.active_view().snapshot is not None, timeout=WAIT_MS)
    yield win
    win.close()
    b.shutdown()


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
