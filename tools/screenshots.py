"""Redo the window screenshots in docs/screenshots/ (offscreen, no display needed).

    python tools/screenshots.py [--model DIR] [--out docs/screenshots]

Scenes: a chat with a shared prefix, a masked region, a compression
decision, a splice between two sessions. Uses the demo model unless
`--model` is given. Every step goes through the window's own API (the same
calls the menus and drag and drop make).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from kvscope.engine.tasks.vocab import SYSTEM_PROMPT  # noqa: E402

# The demo model's own format: its system prompt, then a notes turn, then questions.
# Both sessions send the same notes, so they share the system + notes prefix.
SYSTEM = SYSTEM_PROMPT
NOTES = (
    "Notes:\nThe code for locker 7 is 4815.\nThe old farmer walked to the market in the morning.\n"
    "Team Falcon meets in room 212.\nMira's favourite colour is teal.\nThe red door opens at nine."
)


def wait_until(app: object, pred: object, timeout_s: float = 60.0) -> None:
    t0 = time.perf_counter()
    while not pred():  # type: ignore[operator]
        app.processEvents()  # type: ignore[attr-defined]
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("the window did not reach the expected state in time")


def settle(app: object, win: object, ms: int = 300) -> None:
    """Let pending snapshots arrive and one redraw happen."""
    end = time.perf_counter() + ms / 1000
    wait_until(app, lambda: win.bridge.in_flight() == 0)  # type: ignore[attr-defined]
    while time.perf_counter() < end:
        app.processEvents()  # type: ignore[attr-defined]
        time.sleep(0.01)
    win.redraw()  # type: ignore[attr-defined]
    app.processEvents()  # type: ignore[attr-defined]


def chat(app: object, win: object, view: object, text: str) -> None:
    view.send(text)  # type: ignore[attr-defined]
    wait_until(app, lambda: not view.generating)  # type: ignore[attr-defined]
    settle(app, win)


def shoot(win: object, out: Path, name: str) -> Path:
    path = out / name
    win.grab().save(str(path))  # type: ignore[attr-defined]
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "screenshots"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtWidgets import QApplication

    import kvscope.engine  # noqa: F401
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    bridge = EngineBridge()
    win = MainWindow(bridge)
    win.resize(1600, 1000)
    win.show()
    try:
        return _scenes(app, win, out, args.model)
    finally:
        win.close()
        bridge.shutdown()


def _scenes(app: object, win: object, out: Path, model: str | None) -> int:
    win.load_model(model)
    wait_until(app, lambda: len(win.views) == 1, 120)
    a = win.active_view()
    win.close_session(a.sid)
    wait_until(app, lambda: not win.views)
    win.new_session("alice", SYSTEM)
    wait_until(app, lambda: len(win.views) == 1)
    a = win.active_view()
    a.max_tokens.setValue(40)
    chat(app, win, a, NOTES)
    chat(app, win, a, "What is the code for locker 7?")
    win.new_session("bob", SYSTEM)
    wait_until(app, lambda: len(win.views) == 2)
    b = win.active_view()
    b.max_tokens.setValue(40)
    chat(app, win, b, NOTES)
    chat(app, win, b, "Which room does team Falcon meet in?")
    win.tabs.setCurrentWidget(win.latency)
    settle(app, win)
    shoot(win, out, "shared_prefix.png")

    a.select(16, 40)
    a.actions_.mask()
    settle(app, win)
    a.select(16, 40)
    win.set_active(a.sid)
    settle(app, win)
    shoot(win, out, "masked_region.png")

    b.select(48, 72)
    n_a = len(a.strip.texts)
    a.actions_.splice(b.sid, 48, 72, 32)  # between blocks 1 and 2 of alice
    settle(app, win, 500)
    a.select(32, 56)
    win.set_active(a.sid)
    win.tabs.setCurrentWidget(win.latency)
    settle(app, win)
    print(f"alice grew from {n_a} to {len(a.strip.texts)} tokens")
    shoot(win, out, "splice.png")
    from kvscope.ui.dialogs import policy_names

    win.set_active(b.sid)
    win.tabs.setCurrentWidget(win.decisions)
    policies = policy_names()
    policy = "snapkv" if "snapkv" in policies else policies[0]
    b.actions_.compress(policy, 0.5, None)
    settle(app, win, 500)
    shoot(win, out, "compression_decision.png")

    if win.last_error:
        print(f"last error shown in the window: {win.last_error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
