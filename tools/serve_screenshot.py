"""Redo docs/screenshots/requests_panel.png: the window serving the agent-clock sample log.

    python tools/serve_screenshot.py [--out docs/screenshots] [--n 6]

Offscreen. The window's Serve toggle starts `kvscope serve` on a free port;
the official `openai` client sends the first requests of the sample log
whose system prompt carries a clock; the last request is selected so the
panel shows where its prefix broke.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--n", type=int, default=6)
    args = p.parse_args()
    import openai
    from PySide6.QtWidgets import QApplication

    import kvscope.engine  # noqa: F401
    from kvscope.server import ServeOptions
    from kvscope.server.samples import write_samples
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    bridge = EngineBridge()
    win = MainWindow(bridge)
    win.resize(1500, 950)
    win.show()
    win.load_model(None)
    win.requests.start(ServeOptions(port=0, session_budget_bytes=4 << 20))
    wait(app, lambda: win.requests.server is not None)
    log = next(p for p in write_samples(tempfile.mkdtemp()) if p.stem == "agent-clock")
    bodies = [json.loads(line) for line in log.read_text().splitlines()][: args.n]
    url = win.requests.server.base_url
    done: list[object] = []

    def send() -> None:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for b in bodies:
            done.append(
                client.chat.completions.create(
                    model="kvscope-demo", messages=b["messages"], max_tokens=12, temperature=0, user="clock-agent"
                )
            )

    threading.Thread(target=send, daemon=True).start()
    wait(app, lambda: len(done) == len(bodies) and win.requests.table.rowCount() == len(bodies))
    win.tabs.setCurrentWidget(win.requests)
    win.requests.table.selectRow(len(bodies) - 1)
    win.requests.table.scrollToBottom()
    wait(app, lambda: bridge.in_flight() == 0)
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)
    win.redraw()
    out = Path(args.out) / "requests_panel.png"
    win.grab().save(str(out))
    print(out)
    win.close()
    bridge.shutdown()
    return 0


def wait(app: object, pred: object, timeout_s: float = 120.0) -> None:
    t0 = time.perf_counter()
    while not pred():  # type: ignore[operator]
        app.processEvents()  # type: ignore[attr-defined]
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("the window did not reach the expected state in time")


if __name__ == "__main__":
    sys.exit(main())
