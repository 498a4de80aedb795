"""Keyboard and message box (issue 18): Enter sends, Shift+Enter is a newline;
the token strip works from the keyboard; single-key shortcuts never fire into
a text field and Ctrl+Z undoes the edit elsewhere; Edit actions need a
selection. Offscreen, tiny random model."""

from __future__ import annotations

from conftest import WAIT_MS, chat, engine_call, settle
from PySide6.QtCore import Qt

from kvscope.engine.blocks import TokenState

CTRL, SHIFT = Qt.KeyboardModifier.ControlModifier, Qt.KeyboardModifier.ShiftModifier


def masked(window, sid: str):
    return engine_call(window, lambda e: e.snapshot(sid)).token_state == TokenState.MASKED


def test_enter_sends_and_shift_enter_is_a_newline(qtbot, window):
    view = window.active_view()
    view.max_tokens.setValue(5)
    qtbot.keyClicks(view.prompt, "first line")
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return, SHIFT)
    qtbot.keyClicks(view.prompt, "second line")
    assert view.prompt.text() == "first line\nsecond line" and not view.generating
    qtbot.keyClick(view.prompt, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: not view.generating, timeout=WAIT_MS)
    settle(qtbot, window)
    assert engine_call(window, lambda e: e.snapshot(view.sid)).messages[-2] == ("user", "first line\nsecond line")
    assert view.prompt.text() == ""


def test_select_from_the_keyboard_mask_with_m_and_shortcuts_never_fire_into_a_text_field(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue and the locker is green", max_tokens=20)
    strip = view.strip
    strip.setFocus()
    qtbot.keyClick(strip, Qt.Key.Key_Home, CTRL)
    for _ in range(3):
        qtbot.keyClick(strip, Qt.Key.Key_Right)
    for _ in range(5):
        qtbot.keyClick(strip, Qt.Key.Key_Right, SHIFT)
    assert view.selection() == (3, 9)
    qtbot.keyClick(strip, Qt.Key.Key_Down, SHIFT)  # one block further
    assert view.selection() == (3, 9 + view.block_size)
    qtbot.keyClick(strip, Qt.Key.Key_Up, SHIFT)
    assert view.selection() == (3, 9)
    # In the message box, M is a letter and Ctrl+Z undoes typing: no edit happens.
    view.prompt.setFocus()
    qtbot.keyClick(view.prompt, Qt.Key.Key_M)
    assert view.prompt.text() == "m"
    qtbot.keyClick(view.prompt, Qt.Key.Key_Z, CTRL)
    assert view.prompt.text() == ""
    settle(qtbot, window)
    assert not masked(window, view.sid).any()
    # In the strip, M masks the span.
    strip.setFocus()
    qtbot.keyClick(strip, Qt.Key.Key_M)
    settle(qtbot, window)
    state = masked(window, view.sid)
    assert state[:, 3:9].all() and not state[:, :3].any() and not state[:, 9:].any()
    # Focus in the (read-only) transcript: Ctrl+Z undoes the edit, not text.
    view.chat.setFocus()
    qtbot.keyClick(view.chat, Qt.Key.Key_Z, CTRL)
    settle(qtbot, window)
    assert not masked(window, view.sid).any()


def test_edit_actions_need_a_selection_and_name_their_session(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue", max_tokens=10)
    acts = window.edit_actions
    assert not acts["mask"].isEnabled() and not acts["compact"].isEnabled() and not acts["delete"].isEnabled()
    assert "select a span" in acts["mask"].text()
    view.strip.setFocus()
    qtbot.keyClick(view.strip, Qt.Key.Key_M)  # disabled: nothing happens, nothing queued
    settle(qtbot, window)
    assert not masked(window, view.sid).any()
    view.strip.setFocus()
    qtbot.keyClick(view.strip, Qt.Key.Key_Right, SHIFT)
    lo, hi = view.selection()
    assert hi > lo and acts["mask"].isEnabled() and acts["compact"].isEnabled()
    assert acts["mask"].text() == f"Mask [{lo}, {hi}) of {view.name}"
    assert acts["undo"].isEnabled() and view.name in acts["undo"].text()
    qtbot.keyClick(view.strip, Qt.Key.Key_Escape)
    assert view.selection()[1] == view.selection()[0] and not acts["mask"].isEnabled()


def test_the_token_strip_takes_focus_with_tab_and_scrolls_to_the_cursor(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue " * 30, max_tokens=40)
    assert view.strip.focusPolicy() & Qt.FocusPolicy.TabFocus
    view.strip.setFocus()
    qtbot.keyClick(view.strip, Qt.Key.Key_End, CTRL)
    n = len(view.strip.texts)
    assert view.selection() == (n - 1, n)
    bar = view.strip_scroll.verticalScrollBar()
    assert bar.maximum() == 0 or bar.value() > 0  # the last row is scrolled into view


def test_clicking_or_typing_into_a_session_makes_it_the_active_one(qtbot, window):
    a = window.active_view()
    window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    b = next(v for v in window.views.values() if v is not a)
    assert window.active == b.sid
    window.compare(a.sid, b.sid)
    qtbot.mouseClick(a.prompt, Qt.MouseButton.LeftButton)  # click into a's message box
    qtbot.waitUntil(lambda: window.active == a.sid, timeout=WAIT_MS)
    assert a.name in window.edit_actions["undo"].text()
    window.area.panes[1].tabBar().tabBarClicked.emit(0)  # b's tab, clicked
    assert window.active == b.sid
