"""The window's seams (issue 14): one edit-action table that every surface
reads, one drag format, a status bar that follows engine events instead of
polling. Tiny random model, offscreen."""

from __future__ import annotations

import json

import pytest
from conftest import WAIT_MS, chat, engine_call, send_drop, settle
from PySide6.QtCore import QMimeData, QPoint, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence

from kvscope.ui.actions import EDIT_ACTIONS, enabled, shortcut_text
from kvscope.ui.drag_format import (
    MIME_SEGMENT,
    DragFormatError,
    DraggedSegment,
    decode_segment,
    encode_segment,
    refusal,
)
from kvscope.ui.status import StatusBar

NO_KEYS = Qt.KeyboardModifier.NoModifier


def _menu_entries(actions: list[QAction]) -> list[QAction]:
    return [a for a in actions if not a.isSeparator()]


def test_the_edit_menu_and_the_context_menu_show_the_one_tables_labels(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the red code is blue", max_tokens=8)
    edit_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&Edit")
    for span in ((0, 0), (2, 5)):  # no selection, then a span
        view.select(*span)
        edit_menu.aboutToShow.emit()
        context = _menu_entries(view.actions_.build_menu().actions())
        edit = _menu_entries(edit_menu.actions())
        assert len(edit) == len(context) == len(EDIT_ACTIONS)
        for action, in_edit, in_context in zip(EDIT_ACTIONS, edit, context, strict=True):
            assert in_edit.text().startswith(action.label), in_edit.text()
            assert in_context.text() == f"{action.label}\t{shortcut_text(action)}"
            assert in_edit.shortcut() == QKeySequence(action.shortcut)
            # One enabled rule on both surfaces.
            assert in_edit.isEnabled() == in_context.isEnabled() == enabled(action, span, False), action.key
    separators = sum(a.isSeparator() for a in edit_menu.actions())
    assert separators == len({a.group for a in EDIT_ACTIONS}) - 1


def test_a_dragged_segment_round_trips_through_the_drag_format(qtbot):
    seg = DraggedSegment("s3", 4, 19)
    mime = encode_segment(seg, "the red code")
    assert decode_segment(mime) == seg and mime.text() == "the red code"
    assert decode_segment(QMimeData()) is None  # no segment: not an error
    assert refusal(mime, "other", NO_KEYS) is None
    assert "own session" in (refusal(mime, "s3", NO_KEYS) or "")
    assert refusal(mime, "s3", Qt.KeyboardModifier.ControlModifier) is None  # Ctrl: splice into itself


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (json.dumps(["s1", 0, 4]).encode(), 'exactly "session", "lo" and "hi"'),
        (json.dumps({"session": "s1", "lo": 0}).encode(), 'exactly "session", "lo" and "hi"'),
        (json.dumps({"session": "", "lo": 0, "hi": 4}).encode(), "non-empty string"),
        (json.dumps({"session": "s1", "lo": "0", "hi": 4}).encode(), "lo must be a whole number"),
        (json.dumps({"session": "s1", "lo": True, "hi": 4}).encode(), "lo must be a whole number"),
        (json.dumps({"session": "s1", "lo": 4, "hi": 4}).encode(), "empty or negative"),
        (json.dumps({"session": "s1", "lo": -2, "hi": 4}).encode(), "empty or negative"),
        (b'{"session": "' + b"x" * 5000 + b'", "lo": 0, "hi": 4}', "at most"),
    ],
)
def test_a_malformed_segment_payload_is_refused_with_the_reason(qtbot, payload, reason):
    mime = QMimeData()
    mime.setData(MIME_SEGMENT, payload)
    with pytest.raises(DragFormatError, match=reason):
        decode_segment(mime)
    why = refusal(mime, "s1", NO_KEYS)
    assert why is not None and why.startswith("the dragged segment is malformed") and reason in why


def test_a_malformed_drop_on_a_view_is_refused_and_changes_nothing(qtbot, window):
    view = window.active_view()
    chat(qtbot, window, view, "the locker code is 4 8 1 5", max_tokens=8)
    n = engine_call(window, lambda e: e.snapshot(view.sid)).n_tokens
    mime = QMimeData()
    mime.setData(MIME_SEGMENT, json.dumps({"session": view.sid, "lo": 9, "hi": 2}).encode())
    refused: list[str] = []
    view.strip.drop_refused.connect(refused.append)
    end = QPoint(80, view.strip.n_rows * view.strip.row_h + 2)
    assert not send_drop(view.strip, mime, end)
    settle(qtbot, window)
    assert refused and "[9, 2) is empty or negative" in refused[0]
    assert "malformed" in window.status.currentMessage()
    assert engine_call(window, lambda e: e.snapshot(view.sid)).n_tokens == n


def _figures(window) -> tuple[int, int]:
    return window.status.info.get("sessions", -1), window.status.info.get("cache_bytes", -1)


def _engine_figures(window) -> tuple[int, int]:
    return engine_call(window, lambda e: (len(e.sessions()), e.cache_bytes()))


def test_the_status_bar_follows_turns_and_closes_without_a_timer(qtbot, window):
    status = window.status
    assert not [t for t in status.findChildren(QTimer) if t.isActive()], "the status bar polls on a timer"
    view = window.active_view()
    settle(qtbot, window)
    asked = status.info_requests
    qtbot.wait(300)  # idle: nothing asks the engine
    assert status.info_requests == asked
    empty = _figures(window)
    chat(qtbot, window, view, "the red code is blue and the door is green", max_tokens=12)
    qtbot.waitUntil(lambda: _figures(window) == _engine_figures(window), timeout=WAIT_MS)
    after_turn = _figures(window)
    assert after_turn[1] > empty[1] and status.info_requests > asked
    assert f"cache {after_turn[1] / 2**20:.1f} MiB" in status.device_label.full_text
    window.new_session()
    qtbot.waitUntil(lambda: len(window.views) == 2, timeout=WAIT_MS)
    other = next(v for v in window.views.values() if v is not view)
    chat(qtbot, window, other, "a second chat with a different prompt", max_tokens=12)
    qtbot.waitUntil(lambda: _figures(window) == _engine_figures(window), timeout=WAIT_MS)
    two = _figures(window)
    assert two[0] == 2 and two[1] > after_turn[1]
    window.close_session(other.sid)
    qtbot.waitUntil(lambda: len(window.views) == 1, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: _figures(window) == _engine_figures(window), timeout=WAIT_MS)
    assert _figures(window)[0] == 1 and _figures(window)[1] < two[1]  # the closed session's cache is gone


def test_requests_for_figures_while_one_is_in_flight_ask_once_more(qtbot, bridge):
    status = StatusBar(bridge)
    qtbot.addWidget(status)
    qtbot.waitUntil(lambda: "model" in status.info, timeout=WAIT_MS)  # the first request, at start
    asked = status.info_requests
    for _ in range(5):
        status.request_info()
    qtbot.waitUntil(lambda: bridge.in_flight() == 0, timeout=WAIT_MS)
    qtbot.wait(50)
    qtbot.waitUntil(lambda: bridge.in_flight() == 0, timeout=WAIT_MS)
    assert status.info_requests == asked + 2  # one now, one for everything asked meanwhile
