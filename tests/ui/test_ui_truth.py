"""The window edits the session you chose and its readings tell the truth
(issue 13): the active role, the progress bar, failed loads, drags, streamed
tokens. Tiny random model, offscreen."""

from __future__ import annotations

from conftest import WAIT_MS, chat, close_window, drag_select, engine_call, open_window, send_drop, settle, strip_point
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QApplication

from kvscope.engine import EngineConfig
from kvscope.engine.blocks import TokenState
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import PrefillChunk

LONG_PROMPT = " ".join(["the red code is blue and the locker is green"] * 60)  # > 256 tokens


def test_streaming_session_with_a_leftover_selection_does_not_take_the_active_role(qtbot, window):
    a = window.active_view()
    window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    b = next(v for v in window.views.values() if v is not a)
    chat(qtbot, window, b, "what is the colour of the water", max_tokens=20)
    a.max_tokens.setValue(5000)
    a.send("the red code is blue")  # a streams for a while
    qtbot.waitUntil(lambda: len(a.live_texts) > 10, timeout=WAIT_MS)
    window.redraw()
    drag_select(qtbot, a.strip, 2, 6)  # the person selects in a while it streams...
    assert window.active == a.sid
    window.sessions.select(b.sid)  # ...then picks b in the session list
    for _ in range(8):  # ~10 redraws of the streaming view, each with a's leftover selection
        qtbot.wait(100)
        assert window.active == b.sid, "the streaming session took the active role back"
    drag_select(qtbot, b.strip, 3, 9)
    assert b.name in window.edit_actions["mask"].text() and "[3, 9)" in window.edit_actions["mask"].text()
    assert a.generating, "a stopped early: the test needs it streaming"
    qtbot.keyClick(b.strip, Qt.Key.Key_M)  # the edit is queued behind a's generation
    assert "queued behind" in window.status.currentMessage() and a.name in window.status.currentMessage()
    window.bridge.cancel(a.sid)
    qtbot.waitUntil(lambda: not a.generating, timeout=WAIT_MS)
    settle(qtbot, window)
    sb = engine_call(window, lambda e: e.snapshot(b.sid)).token_state
    sa = engine_call(window, lambda e: e.snapshot(a.sid)).token_state
    assert (sb[:, 3:9] == TokenState.MASKED).all()
    assert not (sa == TokenState.MASKED).any(), "the edit landed on the streaming session"
    assert window.report.last is not None and window.report.last[1] == b.name


def _progress_closed(qtbot, window, start) -> list[int]:
    """Run `start()`, wait for the turn to end; the percents the bar closed at."""
    closed: list[int] = []
    window.status.progress_finished.connect(closed.append)
    shown = []
    window.status.progress.valueChanged.connect(lambda v: shown.append(v))
    view = window.active_view()
    start(view)
    qtbot.waitUntil(lambda: not view.generating, timeout=WAIT_MS)
    settle(qtbot, window)
    assert shown, "the progress bar never showed the prefill"
    assert window.status.progress.isHidden()
    window.status.progress_finished.disconnect(closed.append)
    return closed


def test_prefill_progress_reaches_100_and_closes_after_finish_cancel_and_error(qtbot, llama_dir):
    window = open_window(qtbot, llama_dir, EngineConfig(prefill_chunk=64))
    try:
        view = window.active_view()
        view.max_tokens.setValue(3)
        assert _progress_closed(qtbot, window, lambda v: v.send(LONG_PROMPT)) == [100]

        def cancel_mid_prefill(v) -> None:
            def on_events(batch) -> None:
                if any(isinstance(e, PrefillChunk) for e in batch):
                    window.bridge.cancel(v.sid)

            window.bridge.events.connect(on_events)
            v.max_tokens.setValue(4000)
            v.send(LONG_PROMPT + " again")

        assert _progress_closed(qtbot, window, cancel_mid_prefill) == [100]

        def fail_mid_prefill(v) -> None:
            def planted(ev) -> None:  # runs on the engine thread, inside the prefill
                if isinstance(ev, PrefillChunk):
                    unsubscribe()
                    raise InvalidRequestError("planted failure during prefill")

            unsubscribe = window.bridge.worker.engine.subscribe(planted)
            v.send(LONG_PROMPT + " once more")

        assert _progress_closed(qtbot, window, fail_mid_prefill) == [100]
        assert "planted failure" in window.status.error_text()
    finally:
        close_window(window)


def test_a_failed_model_load_changes_nothing(qtbot, window, tmp_path):
    first = window.active_view()
    chat(qtbot, window, first, "the red code")
    window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    settle(qtbot, window)
    before = dict(window.views)
    model_text = window.status.model_text()
    assert "llama" in model_text
    not_a_model = tmp_path / "just a folder"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("not a model")
    window.load_model(str(not_a_model))
    settle(qtbot, window)
    qtbot.wait(100)
    assert window.views == before and set(window.area.views()) == set(before.values())
    assert window.sessions.sessions() == list(before)
    assert window.status.model_text() == model_text  # still the model that is loaded
    assert "could not load" in window.status.error_text() and "still using" in window.status.error_text()
    window.status.showMessage("something else", 100)
    qtbot.wait(300)
    assert "could not load" in window.status.error_text()  # errors stay until dismissed
    chat(qtbot, window, first, "the blue door")  # the old sessions still work
    assert engine_call(window, lambda e: e.snapshot(first.sid)).messages[-2] == ("user", "the blue door")
    window.status.dismiss_btn.click()
    assert window.status.error_text() == ""


def test_a_click_inside_the_selection_selects_and_a_drag_starts_only_past_the_drag_distance(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the locker code is 4 8 1 5 and the red door is blue", max_tokens=20)
    strip = view.strip
    drags: list[tuple[int, int]] = []
    strip.start_drag = lambda: drags.append(strip.selection)  # QDrag.exec needs a real display
    drag_select(qtbot, strip, 3, 9)
    p = strip_point(strip, 5)
    near = p + QPoint(QApplication.startDragDistance() - 2, 0)
    qtbot.mousePress(strip, Qt.MouseButton.LeftButton, pos=p)
    qtbot.mouseMove(strip, near)
    qtbot.mouseRelease(strip, Qt.MouseButton.LeftButton, pos=near)
    assert drags == [] and strip.selection == (5, 6)  # a click re-selects, it never drags
    drag_select(qtbot, strip, 3, 9)
    qtbot.mousePress(strip, Qt.MouseButton.LeftButton, pos=p)
    qtbot.mouseMove(strip, p + QPoint(QApplication.startDragDistance() + 4, 0))
    assert drags == [(3, 9)]
    qtbot.mouseRelease(strip, Qt.MouseButton.LeftButton, pos=p)


def test_a_span_dropped_on_its_own_session_is_refused_unless_ctrl_is_held(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the locker code is 4 8 1 5 and the red door is blue", max_tokens=20)
    n = engine_call(window, lambda e: e.snapshot(view.sid)).n_tokens
    view.select(2, 6)
    end = QPoint(80, view.strip.n_rows * view.strip.row_h + 2)
    assert not send_drop(view.strip, view.strip.segment_mime(), end)
    settle(qtbot, window)
    assert engine_call(window, lambda e: e.snapshot(view.sid)).n_tokens == n
    assert "own session" in window.status.currentMessage()
    vb = view.block_map.getViewBox()
    at = view.block_map.mapFromScene(vb.mapViewToScene(view.block_map.getViewBox().viewRect().center()))
    assert not send_drop(view.block_map.viewport(), view.strip.segment_mime(), at)
    assert send_drop(view.strip, view.strip.segment_mime(), end, Qt.KeyboardModifier.ControlModifier)
    settle(qtbot, window)
    snap = engine_call(window, lambda e: e.snapshot(view.sid))
    assert snap.n_tokens == n + 4 and (snap.token_state[:, n:] == TokenState.SPLICED).all()


def test_streamed_tokens_are_never_empty_and_the_header_moves_while_streaming(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code", max_tokens=30)
    seen_texts, headers = [], []
    view.max_tokens.setValue(6000)
    view.temperature.setValue(1.0)  # random tokens: byte pieces that are not whole characters
    view.seed.setValue(3)
    view.send("tell me everything")
    qtbot.waitUntil(lambda: len(view.live_texts) > 5, timeout=WAIT_MS)
    for _ in range(6):
        qtbot.wait(120)
        window.redraw()
        if not view.generating:  # the turn ended (a random model may say <|im_end|>)
            break
        seen_texts.append(view.strip.texts)
        headers.append(view.info.full_text)
    streamed_empty = sum(1 for t in view.live_texts if t == "")
    window.bridge.cancel(view.sid)
    qtbot.waitUntil(lambda: not view.generating, timeout=WAIT_MS)
    assert streamed_empty > 0  # the case is exercised: pieces the detokenizer held back
    assert all("" not in texts for texts in seen_texts)  # drawn as "∅" before
    assert len(set(headers)) >= 3, headers  # tokens, KiB and position move while streaming
    n_tokens = [int(h.split()[0]) for h in headers]
    assert n_tokens == sorted(n_tokens) and n_tokens[-1] > n_tokens[0]
    settle(qtbot, window)
    snap = engine_call(window, lambda e: e.snapshot(view.sid))
    assert (
        view.info.full_text.startswith(f"{snap.n_tokens} tokens")
        and f"next position {snap.offset}" in view.info.full_text
    )
