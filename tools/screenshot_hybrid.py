"""The window on a hybrid model (recurrent state + attention layers): docs/screenshots/hybrid_layers.png.

    python tools/screenshot_hybrid.py [--arch qwen3_next] [--out docs/screenshots]

Builds a tiny random model of the architecture (tests/zoo_configs.py), opens
it in the window offscreen, chats twice, masks a span (measured: the
recurrent layers already absorbed it) and hovers a state layer, so the
picture shows attention layers as rows of blocks and state layers as what
they are.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from screenshots import chat, settle, shoot, wait_until  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen3_next")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtWidgets import QApplication

    import kvscope.engine  # noqa: F401
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow
    from tiny_models import make_zoo_model

    folder = make_zoo_model(Path(tempfile.mkdtemp()) / args.arch, args.arch)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    bridge = EngineBridge()
    win = MainWindow(bridge)
    win.resize(1400, 800)
    win.show()
    try:
        win.load_model(str(folder))
        wait_until(app, lambda: len(win.views) == 1, 120)
        view = win.active_view()
        view.max_tokens.setValue(40)
        chat(app, win, view, "the code for locker seven is red blue green and the name is " * 3)
        chat(app, win, view, "what is the code for locker seven")
        view.select(20, 52)
        view.actions_.mask()
        settle(app, win, 500)
        view.select(20, 52)
        settle(app, win)
        snap = view.snapshot
        state_layer = next(i for i, label in enumerate(snap.layer_labels) if "state" in label)
        view._on_block_hovered(state_layer, 2)
        settle(app, win)
        shoot(win, out, "hybrid_layers.png")
        print(view.describe_block(state_layer, 2))
        if win.last_error:
            print(f"last error shown in the window: {win.last_error}")
    finally:
        win.close()
        bridge.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
