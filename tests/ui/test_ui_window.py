"""The window: drive the widgets and check the engine; drive the engine and
check the widgets. Tiny random model, offscreen."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import WAIT_MS, chat, drag_select, engine_call, send_drop, settle
from PySide6.QtCore import QPoint, QPointF, Qt

from kvscope.engine.blocks import TokenState


def test_chat_streams_into_the_view_and_engine(qtbot, window):
    view = window.active_view()
    view.max_tokens.setValue(20)
    qtbot.keyClicks(view.prompt, "the red code is blue")
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: not view.generating, timeout=WAIT_MS)
    settle(qtbot, window)
    snap = engine_call(window, lambda e: e.snapshot(view.sid))
    assert snap.messages[-2] == ("user", "the red code is blue")
    assert len(view.strip.texts) == snap.n_tokens
    assert view.block_map.image.image.shape == (snap.n_blocks, snap.n_layers)
    assert "assistant:" in view.chat.toPlainText()
    assert window.latency.table.rowCount() == 1


def test_select_span_and_mask_then_undo(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue and the locker is green")
    drag_select(qtbot, view.strip, 3, 9)
    assert view.selection() == (3, 9)
    region = view.block_map.selection.getRegion()
    assert region == pytest.approx((3 / 16, 9 / 16))
    view.setFocus()
    qtbot.keyClick(view.strip, Qt.Key.Key_M)  # the "Mask span" shortcut
    settle(qtbot, window)
    state = engine_call(window, lambda e: e.snapshot(view.sid)).token_state
    assert (state[:, 3:9] == TokenState.MASKED).all()
    assert (state[:, :3] != TokenState.MASKED).all()
    assert (view.strip.states[3:9] == TokenState.MASKED).all()
    report = view.actions_.last_report
    assert report is not None and {"cosine", "kl", "top1_agree"} <= report.keys()
    qtbot.keyClick(view.strip, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    settle(qtbot, window)
    state = engine_call(window, lambda e: e.snapshot(view.sid)).token_state
    assert not (state == TokenState.MASKED).any()
    assert not (view.strip.states == TokenState.MASKED).any()


def test_engine_edit_shows_in_the_widgets(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue")
    engine_call(window, lambda e: e.mask(view.sid, 0, 4))
    settle(qtbot, window)
    assert (view.strip.states[:4] == TokenState.MASKED).all()
    image = view.block_map.image.image  # [blocks, layers]
    assert image.shape[0] >= 1


def test_drag_span_between_sessions_splices(qtbot, window):
    a = window.active_view()
    chat(qtbot, window, a, "the locker code is 4 8 1 5")
    window.new_session("b")
    qtbot.waitUntil(lambda: len(window.views) == 2 and window.active_view() is not a, timeout=WAIT_MS)
    b = window.active_view()
    chat(qtbot, window, b, "what is the colour of the door")
    n_before = engine_call(window, lambda e: e.snapshot(b.sid)).n_tokens
    drag_select(qtbot, a.strip, 4, 12)
    mime = a.strip.segment_mime()
    assert json.loads(bytes(mime.data("application/x-kvscope-segment")).decode()) == {
        "session": a.sid,
        "lo": 4,
        "hi": 12,
    }
    # Drop below the last row of b's strip: append at the end.
    send_drop(b.strip, mime, QPoint(80, b.strip.n_rows * b.strip.row_h + 2))
    settle(qtbot, window)
    snap = engine_call(window, lambda e: e.snapshot(b.sid))
    assert snap.n_tokens == n_before + 8
    assert (snap.token_state[:, n_before:] == TokenState.SPLICED).all()
    assert (b.strip.states[n_before:] == TokenState.SPLICED).all()
    assert b.actions_.last_report is not None and "cosine" in b.actions_.last_report


def test_drop_on_block_map_between_blocks(qtbot, window):
    a = window.active_view()
    chat(qtbot, window, a, "the locker code is 4 8 1 5 and the red door is blue", max_tokens=30)
    window.new_session("b")
    qtbot.waitUntil(lambda: len(window.views) == 2 and window.active_view() is not a, timeout=WAIT_MS)
    b = window.active_view()
    chat(qtbot, window, b, "the colour of the water", max_tokens=30)
    a.select(2, 6)
    vb = b.block_map.getViewBox()
    pos = b.block_map.mapFromScene(vb.mapViewToScene(QPointF(1.0, 0.5)))  # boundary between blocks 0 and 1
    send_drop(b.block_map.viewport(), a.strip.segment_mime(), pos)
    settle(qtbot, window)
    snap = engine_call(window, lambda e: e.snapshot(b.sid))
    assert (snap.token_state[:, 16:20] == TokenState.SPLICED).all()


def test_save_segment_and_drop_file(qtbot, window, tmp_path):
    from PySide6.QtCore import QMimeData, QUrl

    a = window.active_view()
    chat(qtbot, window, a, "the locker code is 4 8 1 5")
    a.select(2, 7)
    path = tmp_path / "seg.safetensors"
    a.actions_.save(path)
    settle(qtbot, window)
    assert path.exists(), window.last_error
    n_before = engine_call(window, lambda e: e.snapshot(a.sid)).n_tokens
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    send_drop(a.strip, mime, QPoint(80, a.strip.n_rows * a.strip.row_h + 2))
    settle(qtbot, window)
    snap = engine_call(window, lambda e: e.snapshot(a.sid))
    assert snap.n_tokens == n_before + 5, window.last_error


def test_apply_policy_from_decision_panel(qtbot, window):
    """Uses Engine.compress (or compression.compress_session until it lands)."""
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue and the locker is green and the water is hot", max_tokens=40)
    panel = window.decisions
    panel.policy.setCurrentIndex(max(panel.policy.findText("random"), 0))
    panel.ratio.setValue(0.5)
    qtbot.mouseClick(panel.apply_btn, Qt.MouseButton.LeftButton)
    settle(qtbot, window)
    assert window.last_error is None, window.last_error
    snap = engine_call(window, lambda e: e.snapshot(view.sid))
    assert (snap.token_state == TokenState.EVICTED).any()
    assert view.sid in panel.decisions
    assert panel.decisions[view.sid].policy in panel.summary.text()
    # Compress reports no fidelity itself: the window measures it after the edit.
    qtbot.waitUntil(lambda: window.report.last_verdict is not None, timeout=WAIT_MS)
    assert "compress" in window.report.title.text() and "after the edit" in window.report.title.text()
    assert (view.strip.states == TokenState.EVICTED).any()
    # The keep-mask and score plots show the whole layer x token grid, not a fixed corner.
    n_layers, n_tokens = snap.token_state.shape
    assert n_tokens > 64
    for plot in (panel.mask_plot, panel.score_plot):
        (x0, x1), (y0, y1) = plot.getViewBox().viewRange()
        assert x0 <= 0 and x1 >= n_tokens and y0 <= 0 and y1 >= n_layers
        # layer i is labelled at its row's centre, and only existing layers are labelled
        left = plot.getAxis("left")
        ((_, ticks),) = left.tickValues(y0, y1, 200)
        assert ticks == [i + 0.5 for i in range(n_layers)]
        assert left.tickStrings(ticks, 1, 1) == [str(i) for i in range(n_layers)]


def test_export_trace(qtbot, window, tmp_path):
    view = window.active_view()
    chat(qtbot, window, view, "the red code")
    path = tmp_path / "trace.json"
    window.export_trace(path)
    settle(qtbot, window)
    trace = json.loads(path.read_text())
    assert trace["traceEvents"]
    assert any(e.get("ph") == "X" and "dur" in e for e in trace["traceEvents"])


def test_session_list_new_duplicate_rename_close(qtbot, window):
    panel = window.sessions
    first = window.active
    chat(qtbot, window, window.active_view(), "the red code")
    qtbot.mouseClick(panel.new_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    panel.select(first)
    qtbot.mouseClick(panel.dup_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(window.views) == 3, timeout=WAIT_MS)
    settle(qtbot, window)
    sids = engine_call(window, lambda e: e.sessions())
    assert sorted(sids) == sorted(window.views)
    dup = window.active
    a, d = (engine_call(window, lambda e, s=s: e.snapshot(s)) for s in (first, dup))
    assert np.array_equal(a.token_ids, d.token_ids)
    item = panel._item(dup)
    item.setText("renamed")  # what an in-place edit of the list item does
    settle(qtbot, window)
    assert engine_call(window, lambda e: e.session(dup).name) == "renamed"
    panel.select(dup)
    qtbot.mouseClick(panel.close_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dup not in window.views, timeout=WAIT_MS)
    assert dup not in engine_call(window, lambda e: e.sessions())


def test_many_sessions_fit_1024_wide_and_two_compare_side_by_side(qtbot, window):
    for _ in range(5):
        window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 6, timeout=WAIT_MS)
    settle(qtbot, window)
    window.resize(1024, 700)
    qtbot.wait(50)
    assert window.minimumSizeHint().width() <= 1024
    assert window.width() <= 1024
    status = window.status
    assert status.isVisible() and status.mapTo(window, QPoint(0, status.height())).y() <= window.height()
    view = window.active_view()
    stop = view.stop_btn.mapTo(window, QPoint(view.stop_btn.width(), 0))
    assert view.stop_btn.isVisible() and stop.x() <= window.width()
    # Default names: "chat N", numbered in order, never repeated.
    assert sorted(v.name for v in window.views.values()) == [f"chat {i}" for i in range(1, 7)]
    a, b = list(window.views)[:2]
    window.compare(a, b)
    qtbot.wait(50)
    va, vb = window.views[a], window.views[b]
    assert window.minimumSizeHint().width() <= 1024 and window.width() <= 1024  # two side by side still fit
    assert va.isVisible() and vb.isVisible() and va.width() > 300 and vb.width() > 300
    assert va.mapTo(window, QPoint(va.width(), 0)).x() <= vb.mapTo(window, QPoint(0, 0)).x()
    window.toggle_compare()  # fold back: one pane of tabs
    qtbot.wait(50)
    assert not window.area.comparing and len(window.area.visible_views()) == 1


def test_hover_describes_a_block(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the locker code is 4 8 1 5", max_tokens=30)
    text = view.describe_block(1, 0)
    assert "block 0" in text and "layer 1" in text and "tokens [0, 16)" in text
    assert "hash" in text and "KiB" in text and "shared by" in text and "score" in text


def test_stop_button_cancels_generation(qtbot, window):
    view = window.active_view()
    view.max_tokens.setValue(5000)
    view.send("the red code is blue")
    qtbot.waitUntil(lambda: len(view.live_texts) > 5, timeout=WAIT_MS)
    qtbot.mouseClick(view.stop_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not view.generating, timeout=WAIT_MS)
    settle(qtbot, window)
    turns = engine_call(window, lambda e: e.snapshot(view.sid)).turns
    assert turns[-1].finish_reason == "cancelled"
    assert turns[-1].n_generated < 5000


def test_export_and_import_session(qtbot, window, tmp_path):
    view = window.active_view()
    chat(qtbot, window, view, "the red code")
    first = window.active
    path = tmp_path / "chat.kvsession"
    window.export_session(first, path)
    qtbot.waitUntil(path.exists, timeout=WAIT_MS)
    window.import_session(path)
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    settle(qtbot, window)
    other = next(s for s in window.views if s != first)
    a, b = (engine_call(window, lambda e, s=s: e.snapshot(s)) for s in (first, other))
    assert np.array_equal(a.token_ids, b.token_ids) and a.messages == b.messages


def test_after_a_restart_the_decision_panel_still_shows_the_evictions(qtbot, llama_dir, tmp_path):
    from conftest import close_window, open_window

    from kvscope.engine import EngineConfig

    config = EngineConfig(persist=True, data_dir=str(tmp_path))
    win = open_window(qtbot, llama_dir, config)
    try:
        view = win.active_view()
        chat(qtbot, win, view, "the red code is blue and the locker is green and the water is hot", max_tokens=30)
        view.actions_.compress("random", 0.5, None)
        settle(qtbot, win)
        evicted = (engine_call(win, lambda e: e.snapshot(view.sid)).token_state == TokenState.EVICTED).sum()
        assert evicted > 0
    finally:
        close_window(win)
    win = open_window(qtbot, llama_dir, config)  # the saved session reopens
    try:
        settle(qtbot, win)
        assert win.active_view().sid == view.sid
        assert f"({evicted} in all)" in win.decisions.summary.text()
    finally:
        close_window(win)


def test_headwise_decision_shows_per_head_keep_masks_budgets_and_block_occupancy(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue and the locker is green and the water is hot", max_tokens=40)
    panel = window.decisions
    panel.policy.setCurrentIndex(panel.policy.findText("adakv"))
    panel.ratio.setValue(0.4)
    qtbot.mouseClick(panel.apply_btn, Qt.MouseButton.LeftButton)
    settle(qtbot, window)
    assert window.last_error is None, window.last_error
    snap = engine_call(window, lambda e: e.snapshot(view.sid))
    budgets = snap.head_budgets
    assert budgets is not None and len(budgets) == snap.n_layers
    assert any(not (h == h[0]).all() for h in snap.head_state if h is not None)  # the heads really differ
    heads = panel.heads
    for layer in range(snap.n_layers):
        heads.layer.setValue(layer)
        per_head = snap.head_state[layer]
        assert per_head is not None
        assert np.array_equal(heads.head_img.image, per_head.T)  # head x token, as the cache holds it now
        held = [int(x) for x in (per_head != TokenState.EVICTED).sum(axis=1)]
        assert f"rows held per head {held}" in heads.head_plot.plotItem.titleLabel.text
    assert np.array_equal(heads.budget_img.image, np.asarray(budgets, np.float32).T)
    assert sorted(int(t.toPlainText()) for t in heads._labels) == sorted(b for row in budgets for b in row)
    n_heads = len(budgets[0])
    assert view.block_map.image.image.shape == (snap.n_blocks, snap.n_layers * n_heads)  # one sub-row per head
    text = view.describe_block(0, 0)
    assert "KV heads hold" in text
