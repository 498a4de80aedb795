"""Block map, report panel, latency legends, names and system prompts (issue 18).
Offscreen, tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WAIT_MS, chat, drag_select, engine_call, settle
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QApplication

from kvscope.engine.blocks import TokenState
from kvscope.ui.block_map import FOLLOW_BLOCKS, BlockMap
from kvscope.ui.report_panel import verdict


def _wheel(widget, delta: int) -> None:
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    ev = QWheelEvent(
        pos,
        widget.mapToGlobal(pos),
        QPoint(0, 0),
        QPoint(0, delta),
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
        Qt.ScrollPhase.NoScrollPhase,
        False,
    )
    QApplication.sendEvent(widget, ev)


def test_block_map_follows_the_cache_until_the_person_zooms(qtbot):
    bm = BlockMap()
    qtbot.addWidget(bm)
    bm.resize(600, 200)
    bm.show()
    for n in (3, 40, 400, 900):
        bm.set_states(np.zeros((4, n), np.uint8))
        x0, x1 = bm.visible_blocks()
        assert x1 >= n and x0 <= max(0, n - FOLLOW_BLOCKS) + 1, (n, x0, x1)  # the live end is in view
    _wheel(bm.viewport(), 240)  # the person zooms in
    assert not bm.follow
    zoomed = bm.visible_blocks()
    bm.set_states(np.zeros((4, 1200), np.uint8))
    assert bm.visible_blocks() == pytest.approx(zoomed)  # their zoom is kept
    bm.set_follow(True)
    assert bm.visible_blocks()[1] >= 1200


def test_decode_plot_labels_tokens_at_whole_numbers_that_never_run_together(qtbot):
    from kvscope.ui.latency_panel import LatencyPanel

    panel = LatencyPanel()
    qtbot.addWidget(panel)
    axis = panel.token_plot.getPlotItem().getAxis("bottom")
    for lo, hi, px in ((0, 14, 230), (-0.4, 14.4, 230), (0, 200, 230), (0, 5, 600)):
        ((step, values),) = axis.tickValues(lo, hi, px)
        assert all(float(v).is_integer() and lo <= v <= hi for v in values)  # at the tokens, not between
        assert axis.tickStrings(values, 1, step) == [str(int(v)) for v in values]
        assert len(values) <= px // 30 + 1  # room for two- and three-digit labels
    ((_, values),) = axis.tickValues(0, 14, 230)
    assert values == [0, 5, 10]  # was 0..14 one apart, "11121314" at this width


def test_block_map_ticks_are_whole_numbers_that_never_overlap(qtbot):
    bm = BlockMap()
    qtbot.addWidget(bm)
    axis = bm.getPlotItem().getAxis("bottom")
    for lo, hi, px in ((0, 8, 600), (0.3, 37.7, 500), (0, 2000, 400), (100, 160, 900)):
        ((step, values),) = axis.tickValues(lo, hi, px)
        labels = axis.tickStrings(values, 1, step)
        assert all(float(v - 0.5).is_integer() for v in values) and all(s.isdigit() for s in labels)
        assert len(values) <= px // axis.px_per_label + 1
        assert all(lo <= v <= hi for v in values)
    left = bm.getPlotItem().getAxis("left")
    ((_, values),) = left.tickValues(0, 4, 200)
    assert left.tickStrings(values, 1, 1) == ["0", "1", "2", "3"]  # every layer, none clipped at the edge


def test_hover_text_sits_in_a_fixed_pane(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the locker code is 4 8 1 5", max_tokens=30)
    map_h, label_h = view.block_map.height(), view.hover_label.height()
    view._on_block_hovered(1, 0)
    qtbot.wait(30)
    assert "block 0" in view.hover_label.text() and view.hover_label.text().count("\n") == 1
    assert (view.block_map.height(), view.hover_label.height()) == (map_h, label_h)


def test_verdict_thresholds():
    assert verdict({"kl": 0.0, "top1_agree": 1.0})[0] == "exact"
    assert verdict({"kl": 0.01, "top1_agree": 0.95})[0] == "faithful"
    assert verdict({"kl": 0.5, "top1_agree": 1.0})[0] == "degraded"
    assert verdict({"kl": float("nan"), "top1_agree": float("nan")}) is None
    assert verdict({"path": "x"}) is None


def test_report_panel_names_the_operation_and_session_with_a_verdict(qtbot, window, tmp_path):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue and the locker is green", max_tokens=20)
    drag_select(qtbot, view.strip, 3, 9)
    view.actions_.mask()
    settle(qtbot, window)
    panel = window.report
    assert window.tabs.currentWidget() is panel
    assert "mask" in panel.title.text() and view.name in panel.title.text()
    assert panel.last_verdict in ("exact", "faithful", "degraded") and panel.last_verdict in panel.verdict_label.text()
    names = [panel.table.item(r, 0).text() for r in range(panel.table.rowCount())]
    assert "KL divergence vs recompute (nats)" in names and "kl" not in names and "n_probe" not in names
    view.actions_.save(tmp_path / "seg.safetensors")
    settle(qtbot, window)
    assert "save" in panel.title.text() and panel.last_verdict is None
    assert "no fidelity measured" in panel.verdict_label.text()
    assert not panel.isWindow()  # docked in the window, never a window over the work


def test_latency_legends_drop_closed_sessions_and_open_ones_never_share_a_colour(qtbot, window):
    first = window.active_view()
    for _ in range(2):
        window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 3, timeout=WAIT_MS)
    for v in list(window.views.values()):
        chat(qtbot, window, v, "the red code", max_tokens=8)
    window.redraw()
    lat = window.latency
    assert sorted(lat.legend_names()) == sorted(v.name for v in window.views.values())
    window.close_session(first.sid)
    qtbot.waitUntil(lambda: first.sid not in window.views, timeout=WAIT_MS)
    assert first.name not in lat.legend_names("ms") and first.name not in lat.legend_names("mib")
    for _ in range(6):
        window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 8, timeout=WAIT_MS)
    for v in window.views.values():
        lat.colour_of(v.sid)
    colours = [lat.colours[s] for s in window.views]
    assert len(set(colours)) == len(colours)


def test_names_are_unique_and_new_sessions_take_the_system_prompt(qtbot, window, tmp_path):
    view = window.active_view()
    chat(qtbot, window, view, "the red code", max_tokens=5)
    path = tmp_path / "chat.kvsession"
    window.export_session(view.sid, path)
    qtbot.waitUntil(path.exists, timeout=WAIT_MS)
    window.import_session(path)  # same name as the open session
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    settle(qtbot, window)
    names = [engine_call(window, lambda e, s=s: e.session(s).name) for s in window.views]
    assert len(set(names)) == 2 and view.name in names
    window.sessions.system.setPlainText("You answer in one word.")
    qtbot.mouseClick(window.sessions.new_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(window.views) == 3, timeout=WAIT_MS)
    settle(qtbot, window)
    new = window.active_view()
    assert new.name == "chat 2"
    assert engine_call(window, lambda e: e.snapshot(new.sid)).messages[0] == ("system", "You answer in one word.")
    assert "You answer in one word." in new.system_label.text()
    assert (engine_call(window, lambda e: e.snapshot(new.sid)).token_state != TokenState.MASKED).all()


def test_prefix_tree_merges_shared_prefixes_and_branches_where_sessions_differ(qtbot, window):
    from kvscope.ui.prefix_tree import _walk, build_tree

    system = "You are a careful assistant. The red code is blue and the locker code is green. " * 2
    window.close_session(window.active)
    qtbot.waitUntil(lambda: not window.views, timeout=WAIT_MS)
    for i, question in enumerate(("what is the red code", "what is the locker code", "what colour is the water")):
        window.new_session(system=system)
        qtbot.waitUntil(lambda i=i: len(window.views) == i + 1, timeout=WAIT_MS)
        chat(qtbot, window, window.active_view(), question, max_tokens=12)
    window.tabs.setCurrentWidget(window.prefix_tree)
    settle(qtbot, window)
    snaps = {s.name: s for s in (engine_call(window, lambda e, sid=sid: e.snapshot(sid)) for sid in window.views)}
    root = build_tree(list(snaps.values()))
    assert len(root.children) == 1 and len(root.children[0].sessions) == 3  # the shared system prompt
    assert len(root.children[0].children) >= 2  # they branch at their questions
    bs = window.active_view().block_size
    for node in list(_walk(root))[1:]:  # oracle: the token ids themselves
        lo, hi = node.first_block * bs, (node.first_block + node.n_blocks) * bs
        ids = {tuple(snaps[n].token_ids[lo:hi]) for n in node.sessions}
        assert len(ids) == 1, "sessions in one node must hold the same tokens"
        firsts = [
            tuple(snaps[c.sessions[0]].token_ids[c.first_block * bs : (c.first_block + 1) * bs]) for c in node.children
        ]
        assert len(set(firsts)) == len(firsts), "siblings must differ in their first block"
    tree = window.prefix_tree.tree
    assert tree.topLevelItemCount() == 1 and tree.topLevelItem(0).text(1).startswith("3:")
    tree.itemClicked.emit(tree.topLevelItem(0), 0)
    assert "used by 3 session(s)" in window.prefix_tree.detail.toPlainText()


def test_fidelity_of_a_long_session_is_measured_after_the_edit_and_waits_for_other_work(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue and the locker is green", max_tokens=30)
    twin = engine_call(window, lambda e: e.duplicate_session(view.sid))  # the oracle: the same edit, measured inline
    inline = engine_call(window, lambda e: e.mask(twin, 3, 9).as_dict())
    window.report.inline_max.setValue(0)  # every session counts as long
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    window.set_active(view.sid)
    view.select(3, 9)
    other = next(v for s, v in window.views.items() if s != view.sid)
    measured, shown_first = [], []
    window.fidelity.measured.connect(lambda sid, op, rep: measured.append((sid, op, rep)))
    span = [3, 9]
    window.fidelity.measured.connect(  # the edit's own snapshot came before its measurement
        lambda *_: shown_first.append(
            bool((view.snapshot.token_state[:, span[0] : span[1]] == TokenState.MASKED).all())
        )
    )
    finished = []
    window.bridge.events.connect(lambda b: finished.extend(e for e in b if type(e).__name__ == "GenerationFinished"))
    view.actions_.mask()
    other.max_tokens.setValue(20)
    other.send("what is the colour of the water")  # submitted after the edit, runs before its measurement
    qtbot.waitUntil(
        lambda: window.redraw() >= 0 and bool((view.strip.states[3:9] == TokenState.MASKED).all()), timeout=WAIT_MS
    )
    assert "measuring fidelity" in window.report.verdict_label.text()
    qtbot.waitUntil(lambda: bool(measured), timeout=WAIT_MS)
    assert finished, "the measurement ran before the chat submitted after it"
    assert shown_first == [True], "the measurement ran before the edit reached the window"
    ((sid, op, rep),) = measured
    assert (sid, op) == (view.sid, "mask")
    assert rep["kl"] == pytest.approx(inline["kl"], abs=1e-5) and rep["top1_agree"] == inline["top1_agree"]
    assert window.report.last_verdict is not None and "after the edit" in window.report.title.text()
    span[:] = [20, 24]  # an edit with nothing else going on: its result still comes first,
    # even when the measurement queue is polled right as the edit returns (its worst moment)
    view.actions_.report_ready.connect(lambda *_: window.fidelity._maybe_start())
    view.select(*span)
    view.actions_.mask()
    qtbot.waitUntil(lambda: len(measured) == 2, timeout=WAIT_MS)
    assert shown_first == [True, True]
    measured.pop()
    # Skip: a queued measurement is dropped.
    view.select(12, 14)
    view.actions_.mask()
    window.bridge.call(lambda e: __import__("time").sleep(0.5))  # busy when the edit returns: it stays queued
    qtbot.waitUntil(lambda: view.sid in window.fidelity.pending, timeout=WAIT_MS)
    window.report.skip_btn.click()
    settle(qtbot, window)
    qtbot.wait(300)
    assert len(measured) == 1 and "skipped" in window.report.title.text()
    # A newer operation (here: undo) drops the queued measurement of the state it changes.
    view.select(14, 16)
    view.actions_.mask()
    window.bridge.call(lambda e: __import__("time").sleep(0.5))
    qtbot.waitUntil(lambda: view.sid in window.fidelity.pending, timeout=WAIT_MS)
    view.actions_.undo()
    assert view.sid not in window.fidelity.pending
    settle(qtbot, window)
    qtbot.wait(300)
    assert len(measured) == 1


def test_the_strip_follows_the_live_end_until_the_person_scrolls_away(qtbot, window):
    view = window.active_view()
    view.strip_scroll.resize(view.strip_scroll.width(), 120)
    chat(qtbot, window, view, "the red code is blue " * 20, max_tokens=30)
    bar = view.strip_scroll.verticalScrollBar()
    assert bar.maximum() > 0 and bar.value() == bar.maximum()  # the end is in view
    bar.setValue(0)  # the person scrolls to the top
    chat(qtbot, window, view, "and the locker is green " * 10, max_tokens=30)
    assert bar.value() == 0 and bar.maximum() > 0
