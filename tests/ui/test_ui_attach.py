"""The attach view: a publisher on loopback drives it; the test checks what a person sees."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from PySide6.QtWidgets import QMainWindow, QMessageBox

from kvscope.attach import AttachClient
from kvscope.attach.fleet import prompt_tokens
from kvscope.engine import demo_model_path
from kvscope.engine.blocks import TokenState
from kvscope.engine.kv_events import WireAllBlocksCleared, WireBlockRemoved, WireBlockStored
from kvscope.engine.kv_publisher import ZmqPublisher
from kvscope.ui.attach_view import AttachView
from kvscope.ui.attach_window import AttachDialog, AttachWindow, attach_engine

LOOP = "tcp://127.0.0.1:*"


class _IdsTokenizer:
    """Token ids written as numbers: a stand-in tokenizer without a chat template."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def h(i: int) -> str:
    return f"{i:016x}"


@pytest.fixture
def tok() -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(demo_model_path())


@pytest.fixture
def pub() -> Any:
    p = ZmqPublisher(LOOP, LOOP, topic="kv@t")
    yield p
    p.close()


def tree_events(ids: list[int]) -> list[WireBlockStored]:
    """Two requests: blocks 1-2 shared, then 3 (first request) and 4 (second)."""
    return [
        WireBlockStored((h(1), h(2), h(3)), None, tuple(ids[:12]), 4),
        WireBlockStored((h(4),), h(2), (5, 6, 7, 8), 4),
    ]


def wait_applied(qtbot: Any, view: AttachView, n: int) -> None:
    qtbot.waitUntil(lambda: (view.refresh(), view.grid is not None and view.applied >= n)[1], timeout=20_000)


def test_view_draws_chains_shared_prefix_and_block_text(qtbot: Any, pub: ZmqPublisher, tok: Any) -> None:
    text = "The code for locker 7 is 4821. Team Falcon meets in room 212 today."
    ids = prompt_tokens(tok, text)  # the chat template around the message, as a server sees it
    for ev in tree_events(ids):
        pub.publish([ev])
        assert pub.flush()
    fut: Future[Any] = Future()
    fut.set_result(tok)
    view = AttachView(AttachClient(pub.endpoint, pub.replay_endpoint, topic="kv@"), fut)
    qtbot.addWidget(view)
    try:
        wait_applied(qtbot, view, 2)
        grid = view.grid
        assert grid is not None
        # two chains (rows) of three blocks; the first two blocks are in both: shared
        assert grid.states.tolist() == [[TokenState.SHARED, TokenState.SHARED, TokenState.COMPUTED]] * 2
        assert view.map.image.image is not None and view.map.image.image.shape == (3, 2)  # col-major: blocks x rows
        assert "4 blocks (16 tokens) in 2 chains" in view.header.text()
        assert "hot: 00000000 (reused 0×, 2 branches)" in view.header.text()  # block 2: where they branch
        view.map.hovered.emit(0, 0)  # the pointer on the first block: its text, asked of the cache off the Qt thread
        qtbot.waitUntil(lambda: tok.decode(ids[:4]) in view.detail.toPlainText(), timeout=20_000)
        assert h(1) in view.detail.toPlainText()
        view.prompt.setText(text)  # matched on the view's worker: the answer arrives as a signal
        want = f"cached prefix here: 12 of {len(ids)} tokens"
        qtbot.waitUntil(lambda: view.prompt_hit.text() == want, timeout=20_000)
        pub.publish([WireAllBlocksCleared()])
        assert pub.flush()
        wait_applied(qtbot, view, 3)
        assert view.grid.states.size == 0 and "0 blocks" in view.header.text()
        assert np.all(view.grid.states == TokenState.EMPTY)
    finally:
        view.close_client()


def test_file_attach_docks_a_view_and_a_bad_endpoint_is_shown(qtbot: Any, pub: ZmqPublisher, monkeypatch: Any) -> None:
    win = QMainWindow()
    qtbot.addWidget(win)
    dlg = AttachDialog(win)
    dlg.endpoint.setText(pub.endpoint)
    dlg.replay.setText(str(pub.replay_endpoint))
    dlg.bind.setChecked(False)
    dock = attach_engine(win, dlg)
    assert dock is not None and isinstance(dock.widget(), AttachView)
    pub.publish(tree_events(list(range(12))))
    assert pub.flush()
    wait_applied(qtbot, dock.widget(), 1)
    dock.widget().close_client()

    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda _parent, _title, text: shown.append(text))
    dlg.endpoint.setText("no such endpoint")
    assert attach_engine(win, dlg) is None
    assert shown and "cannot" in shown[0]


def test_attach_window_counts_blocks_held_in_common(qtbot: Any, pub: ZmqPublisher) -> None:
    other = ZmqPublisher(LOOP, LOOP, topic="kv@u")
    try:
        pub.publish(tree_events(list(range(12))))
        # the other engine holds the same first block under its own hash scheme
        other.publish([WireBlockStored(("ab" * 16,), None, (0, 1, 2, 3), 4)])
        assert pub.flush() and other.flush()
        clients = [AttachClient(p.endpoint, p.replay_endpoint) for p in (pub, other)]
        fut: Future[Any] = Future()
        fut.set_result(_IdsTokenizer())
        win = AttachWindow(clients, fut)
        qtbot.addWidget(win)
        for v in win.views:
            wait_applied(qtbot, v, 1)
        want_common = "blocks held by all 2 engines (same tokens from the root): 1"
        win.refresh_common()  # counted on the window's worker thread; the label follows by signal
        qtbot.waitUntil(lambda: want_common in win.common.text(), timeout=20_000)
        win.prompt.setText("0 1 2 3 4 5 6 7 8 9 10 11 12")  # one prompt, every engine answers
        want = ["cached prefix here: 12 of 13 tokens", "cached prefix here: 4 of 13 tokens"]
        qtbot.waitUntil(lambda: [v.prompt_hit.text() for v in win.views] == want, timeout=20_000)
        win.close()
        assert not any(c.alive for c in clients)
    finally:
        other.close()


def test_main_window_file_menu_attaches_a_docked_engine(
    qtbot: Any, window: Any, pub: ZmqPublisher, monkeypatch: Any
) -> None:
    from PySide6.QtWidgets import QDialog, QDockWidget

    def accept(dlg: AttachDialog) -> int:  # the person types the endpoints and presses OK
        dlg.endpoint.setText(pub.endpoint)
        dlg.replay.setText(str(pub.replay_endpoint))
        dlg.bind.setChecked(False)
        return QDialog.DialogCode.Accepted

    monkeypatch.setattr(AttachDialog, "exec", accept)
    file_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&File")
    action = next(a for a in file_menu.actions() if a.text() == "Attach to engine…")
    pub.publish(tree_events(list(range(12))))
    assert pub.flush()
    action.trigger()
    docks = [d for d in window.findChildren(QDockWidget) if isinstance(d.widget(), AttachView)]
    assert len(docks) == 1 and docks[0].windowTitle() == f"Attached: {pub.endpoint}"
    view = docks[0].widget()
    wait_applied(qtbot, view, 1)
    assert "4 blocks (16 tokens) in 2 chains" in view.header.text()
    view.close_client()


def test_evicted_blocks_flash_red_in_the_view_then_go(qtbot: Any, pub: ZmqPublisher) -> None:
    pub.publish(tree_events(list(range(12))))  # rows: 1-2-3 and 1-2-4
    assert pub.flush()
    view = AttachView(AttachClient(pub.endpoint, pub.replay_endpoint), flash_s=1.0)
    qtbot.addWidget(view)
    try:
        wait_applied(qtbot, view, 1)
        assert view.grid is not None and view.grid.rows == ((h(1), h(2), h(3)), (h(1), h(2), h(4)))
        pub.publish([WireBlockRemoved((h(4),), "GPU")])  # the server evicts the second request's block
        assert pub.flush()
        wait_applied(qtbot, view, 2)
        grid = view.grid
        # still drawn where it was, red; blocks 1-2 are in one chain now
        assert grid.states.tolist() == [[TokenState.COMPUTED] * 3, [TokenState.COMPUTED] * 2 + [TokenState.EVICTED]]
        assert "evicted: 1 blocks removed in the last 1 s, shown in red" in view.header.text()
        assert np.array_equal(view.map.image.image, grid.states.T)  # what the map shows
        view.map.hovered.emit(1, 2)
        qtbot.waitUntil(lambda: "EVICTED just now" in view.detail.toPlainText(), timeout=20_000)
        # nothing else arrives; the view redraws on its own until the flash is over
        qtbot.waitUntil(lambda: view.grid.n_flashing == 0, timeout=20_000)
        assert view.grid.states.tolist() == [[TokenState.COMPUTED] * 3]
        assert "evicted:" not in view.header.text()
    finally:
        view.close_client()


class _ThreadCheckingClient(AttachClient):
    """An AttachClient that notes which threads read its cache."""

    readers: set[str]

    def read(self, fn: Any) -> Any:
        self.readers.add(threading.current_thread().name)
        return super().read(fn)


def test_the_qt_thread_never_reads_the_cache_and_one_grid_is_built_at_a_time(qtbot: Any, pub: ZmqPublisher) -> None:
    client = _ThreadCheckingClient(pub.endpoint, pub.replay_endpoint)
    client.readers = set()
    fut: Future[Any] = Future()
    fut.set_result(_IdsTokenizer())
    view = AttachView(client, fut)
    qtbot.addWidget(view)
    submitted: list[str] = []
    real_submit = view._worker.submit
    view._worker.submit = lambda fn, *a: (submitted.append(fn.__name__), real_submit(fn, *a))[1]  # type: ignore[method-assign]
    try:
        pub.publish(tree_events(list(range(12))))
        assert pub.flush()
        qtbot.waitUntil(lambda: client.progress.batches >= 1, timeout=20_000)
        hold = threading.Event()
        real_submit(hold.wait, 20)  # the worker is busy: no grid can come back during the burst
        view._building, view._next_build_at = False, 0.0
        for _ in range(20):  # a burst of timer ticks with something new each time: one build asked for
            view.refresh()
        hold.set()
        assert submitted.count("_build_grid") == 1
        wait_applied(qtbot, view, 1)
        view.map.hovered.emit(0, 1)
        view.prompt.setText("0 1 2 3 4 5 6 7 8")
        qtbot.waitUntil(lambda: view.prompt_hit.text() == "cached prefix here: 8 of 9 tokens", timeout=20_000)
        qtbot.waitUntil(lambda: h(2) in view.detail.toPlainText(), timeout=20_000)
        assert client.readers and threading.main_thread().name not in client.readers
        assert client.readers == {t for t in client.readers if t.startswith("kvscope-attach-view")}
    finally:
        view.close_client()
