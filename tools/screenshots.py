"""Redo the window screenshots in docs/screenshots/ (offscreen, no display needed).

    python tools/screenshots.py [--model DIR] [--out docs/screenshots]

Scenes (1280x800): two chats sharing a prefix, four sessions in tabs, a
masked region, a splice between two sessions side by side with its report,
a compression decision, the prefix tree of four sessions sharing a system
prompt and notes, a ~2,000-token session with the block map following it. Uses the demo model unless
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
    # Fidelity measured after an edit runs when the engine is idle: wait for it too, so no shot says "busy".
    wait_until(app, lambda: win.bridge.in_flight() == 0 and win.fidelity.n_waiting() == 0)  # type: ignore[attr-defined]
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
    win.resize(1280, 800)
    win.show()
    try:
        return _scenes(app, win, out, args.model)
    finally:
        win.close()
        bridge.shutdown()


def _session(app: object, win: object, name: str, system: str | None = SYSTEM) -> object:
    n = len(win.views)  # type: ignore[attr-defined]
    win.new_session(name, system)  # type: ignore[attr-defined]
    wait_until(app, lambda: len(win.views) == n + 1)  # type: ignore[attr-defined]
    view = win.active_view()  # type: ignore[attr-defined]
    view.max_tokens.setValue(40)
    return view


def _scenes(app: object, win: object, out: Path, model: str | None) -> int:
    a, b = _sessions_scenes(app, win, out, model)
    _edit_scenes(app, win, out, a, b)
    _long_scene(app, win, out)
    if win.last_error:
        print(f"last error shown in the window: {win.last_error}")
    return 0


def _sessions_scenes(app: object, win: object, out: Path, model: str | None) -> tuple[object, object]:
    """Two chats sharing a prefix, then four in tabs, then their prefix tree; returns alice and bob."""
    win.load_model(model)
    wait_until(app, lambda: len(win.views) == 1, 120)
    win.close_session(win.active_view().sid)
    wait_until(app, lambda: not win.views)
    a = _session(app, win, "alice")
    chat(app, win, a, NOTES)
    chat(app, win, a, "What is the code for locker 7?")
    b = _session(app, win, "bob")
    chat(app, win, b, NOTES)
    chat(app, win, b, "Which room does team Falcon meet in?")
    win.tabs.setCurrentWidget(win.latency)
    settle(app, win)
    shoot(win, out, "shared_prefix.png")
    for name, question in (("carol", "What colour does Mira like?"), ("dave", "When does the red door open?")):
        v = _session(app, win, name)
        chat(app, win, v, NOTES)
        chat(app, win, v, question)
    win.set_active(b.sid)
    settle(app, win)
    shoot(win, out, "four_sessions.png")
    win.tabs.setCurrentWidget(win.prefix_tree)
    settle(app, win)
    tree = win.prefix_tree.tree
    if tree.topLevelItemCount():
        tree.setCurrentItem(tree.topLevelItem(0))
        tree.itemClicked.emit(tree.topLevelItem(0), 0)
    settle(app, win)
    shoot(win, out, "prefix_tree.png")
    return a, b


def _edit_scenes(app: object, win: object, out: Path, a: object, b: object) -> None:
    """A masked region, a splice side by side with its report, a compression decision."""
    win.set_active(a.sid)
    a.select(16, 40)
    a.actions_.mask()
    settle(app, win)
    shoot(win, out, "masked_region.png")

    win.compare(a.sid, b.sid)
    b.select(48, 72)
    n_a = len(a.strip.texts)
    a.actions_.splice(b.sid, 48, 72, 32)  # between blocks 1 and 2 of alice
    settle(app, win, 500)
    a.select(32, 56)
    settle(app, win)
    print(f"alice grew from {n_a} to {len(a.strip.texts)} tokens")
    shoot(win, out, "splice.png")
    from kvscope.ui.dialogs import policy_names

    win.set_active(b.sid)
    policies = policy_names()
    policy = "snapkv" if "snapkv" in policies else policies[0]
    b.actions_.compress(policy, 0.5, None)
    settle(app, win, 500)
    win.tabs.setCurrentWidget(win.decisions)
    settle(app, win)
    shoot(win, out, "compression_decision.png")
    win.toggle_compare()
    if "adakv" in policies:  # head-wise: each KV head keeps its own rows (AdaKV budgets)
        win.set_active(a.sid)
        win.set_active(b.sid)  # shows bob's view again (compare mode is off)
        b.actions_.undo()  # back to the full cache: the same notes, compressed head-wise instead
        settle(app, win, 500)
        b.actions_.compress("adakv", 0.5, None)
        settle(app, win, 500)
        win.tabs.setCurrentWidget(win.decisions)
        win.decisions.heads.layer.setValue(1)
        settle(app, win)
        shoot(win, out, "compression_headwise.png")


def _long_scene(app: object, win: object, out: Path) -> None:
    """A ~2,000-token session, the block map following its end."""
    long = _session(app, win, "long notes")
    long.max_tokens.setValue(60)
    chat(app, win, long, "Notes:\n" + "\n".join(NOTES.splitlines()[1:]) * 1 + ("\n" + NOTES.split("\n", 1)[1]) * 34)
    chat(app, win, long, "What is the code for locker 7?")
    win.tabs.setCurrentWidget(win.latency)
    settle(app, win)
    print(f"long session: {len(long.strip.texts)} tokens")
    shoot(win, out, "long_session.png")


if __name__ == "__main__":
    sys.exit(main())
