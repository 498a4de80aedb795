"""Drive the real window with real X input (xdotool) on an X server (Xvfb).

Run by `test_ui_real_input.py` in a subprocess with DISPLAY set and
QT_QPA_PLATFORM=xcb; writes what it saw as JSON to `--out`. Every input
goes through the X server: xdotool moves the pointer, presses buttons and
keys; Qt receives them as it would from a person (a real `QDrag` for the
drag between sessions).

    python tests/ui/real_input_driver.py --model DIR --out result.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PySide6.QtCore import QPoint, QTimer
from PySide6.QtWidgets import QApplication, QMenu

from kvscope.engine.blocks import TokenState

TIMEOUT_S = 60.0


def pump(app: QApplication, pred, timeout_s: float = TIMEOUT_S) -> bool:
    t0 = time.perf_counter()
    while not pred():
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout_s:
            return False
    return True


def pause(app: QApplication, ms: int) -> None:
    end = time.perf_counter() + ms / 1000
    pump(app, lambda: time.perf_counter() >= end)


def xdotool(app: QApplication, *args: str) -> None:
    """Run one xdotool command while the Qt event loop keeps running (a QDrag may start meanwhile)."""
    proc = subprocess.Popen(["xdotool", *args])
    pump(app, lambda: proc.poll() is not None)
    if proc.returncode:
        raise RuntimeError(f"xdotool {' '.join(args)} failed ({proc.returncode})")
    pause(app, 150)


def at(widget, point: QPoint) -> list[str]:
    g = widget.mapToGlobal(point)
    return [str(g.x()), str(g.y())]


def token(strip, i: int) -> QPoint:
    return strip.token_rect(i).center()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    bridge = EngineBridge()
    win = MainWindow(bridge)
    win.setGeometry(0, 0, 1280, 800)
    win.show()
    out: dict[str, object] = {"platform": app.platformName()}
    try:
        run(app, win, args.model, out)
    finally:
        Path(args.out).write_text(json.dumps(out, indent=1))
        win.close()
        bridge.shutdown()
    return 0


def context_menu_pick(app: QApplication, out: dict[str, object], label: str, tries: int = 100) -> None:
    """Once a context menu is up (it runs its own event loop), record its entries and click `label` in it."""
    menu = QApplication.activePopupWidget()
    if not isinstance(menu, QMenu):
        if tries:
            QTimer.singleShot(100, lambda: context_menu_pick(app, out, label, tries - 1))
        return
    entries = [a for a in menu.actions() if not a.isSeparator()]
    out["context_menu"] = [a.text() for a in entries]
    target = next(a for a in entries if a.text().split("\t")[0] == label)
    g = menu.mapToGlobal(menu.actionGeometry(target).center())
    subprocess.Popen(["xdotool", "mousemove", str(g.x()), str(g.y()), "click", "1"])


def engine(win, fn):
    return win.bridge.worker.call(fn, timeout=60)


def settle(app, win) -> None:
    pump(app, lambda: win.bridge.in_flight() == 0)
    pause(app, 200)
    win.redraw()


def run(app: QApplication, win, model: str, out: dict[str, object]) -> None:
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    out["stage_s"] = stages

    def stage(name: str) -> None:
        stages[name] = round(time.perf_counter() - t0, 2)

    win.load_model(model)
    assert pump(app, lambda: win.active_view() is not None and win.active_view().snapshot is not None)
    win.activateWindow()
    pause(app, 300)
    a = win.active_view()
    stage("loaded")
    # 1. A multi-line message typed with the keyboard: Shift+Enter is a newline, Enter sends.
    a.max_tokens.setValue(24)
    xdotool(app, "mousemove", *at(a.prompt, QPoint(20, 10)), "click", "1")
    xdotool(app, "type", "--delay", "20", "the locker code")
    xdotool(app, "key", "shift+Return")
    xdotool(app, "type", "--delay", "20", "is 4815")
    out["typed_before_enter"] = a.prompt.text()
    xdotool(app, "key", "Return")
    pump(app, lambda: not a.generating)
    settle(app, win)
    out["sent_message"] = engine(win, lambda e: e.snapshot(a.sid)).messages[-2][1] if a.snapshot else None
    stage("typed")
    # A second session, side by side.
    win.new_session()
    assert pump(app, lambda: len(win.views) == 2)
    b = next(v for v in win.views.values() if v is not a)
    b.max_tokens.setValue(16)
    b.send("what is the colour of the door")
    pump(app, lambda: not b.generating)
    settle(app, win)
    win.compare(a.sid, b.sid)
    settle(app, win)
    stage("second session")
    # 2. Select a span in a with the mouse, then drag it into b (a real QDrag).
    xdotool(
        app,
        "mousemove",
        *at(a.strip, token(a.strip, 2)),
        "mousedown",
        "1",
        "mousemove",
        *at(a.strip, token(a.strip, 5)),
        "mousemove",
        *at(a.strip, token(a.strip, 7)),
        "mouseup",
        "1",
    )
    out["mouse_selection"] = list(a.selection())
    n_b = engine(win, lambda e: e.snapshot(b.sid)).n_tokens
    drop = QPoint(60, b.strip.n_rows * b.strip.row_h + 4)  # below b's last row: append
    start = token(a.strip, 4)
    xdotool(
        app,
        "mousemove",
        *at(a.strip, start),
        "mousedown",
        "1",
        "mousemove",
        *at(a.strip, start + QPoint(12, 0)),
        "sleep",
        "0.2",
        "mousemove",
        *at(a.strip, start + QPoint(40, 0)),
        "sleep",
        "0.2",
        "mousemove",
        *at(b.strip, drop + QPoint(0, -8)),
        "sleep",
        "0.3",
        "mousemove",
        *at(b.strip, drop),
        "sleep",
        "0.3",
        "mouseup",
        "1",
    )
    stage("dragged")
    settle(app, win)
    snap_b = engine(win, lambda e: e.snapshot(b.sid))
    out["drags_started"] = a.strip.drags_started
    out["b_tokens_before_after"] = [n_b, snap_b.n_tokens]
    out["b_new_states"] = sorted({int(x) for x in snap_b.token_state[:, n_b:].ravel()})
    out["report_title"] = win.report.title.text()
    # 3. Keyboard: focus b's strip with a click, select with arrows + Shift, mask with M.
    xdotool(app, "mousemove", *at(b.strip, token(b.strip, 0)), "click", "1")
    xdotool(app, "key", "ctrl+Home", "Right", "Right", "shift+Right", "shift+Right", "shift+Right")
    out["keyboard_selection"] = list(b.selection())
    out["active_after_keys"] = win.active == b.sid
    xdotool(app, "key", "m")
    settle(app, win)
    state = engine(win, lambda e: e.snapshot(b.sid)).token_state
    out["masked_tokens"] = [int(i) for i in (state == int(TokenState.MASKED)).all(axis=0).nonzero()[0]]
    stage("masked")
    # 4. M typed into the message box is a letter, not an edit.
    xdotool(app, "mousemove", *at(b.prompt, QPoint(20, 10)), "click", "1")
    xdotool(app, "key", "m")
    settle(app, win)
    out["prompt_after_m"] = b.prompt.text()
    state = engine(win, lambda e: e.snapshot(b.sid)).token_state
    out["masked_after_typing"] = [int(i) for i in (state == int(TokenState.MASKED)).all(axis=0).nonzero()[0]]
    stage("typed m")
    # 5. A right click on the span opens its context menu; choosing "Unmask" there unmasks it.
    context_menu_pick(app, out, "Unmask")
    xdotool(app, "mousemove", *at(b.strip, token(b.strip, 3)), "click", "3")
    settle(app, win)
    state = engine(win, lambda e: e.snapshot(b.sid)).token_state
    out["masked_after_menu"] = [int(i) for i in (state == int(TokenState.MASKED)).all(axis=0).nonzero()[0]]
    out["errors"] = win.last_error
    stage("done")


if __name__ == "__main__":
    sys.exit(main())
