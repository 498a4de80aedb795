"""The Requests panel scene of docs/screenshots/requests_panel.png (tools/screenshots.py runs it last).

    python tools/serve_screenshot.py [--out docs/screenshots] [--n 6]   # this scene alone

The window's Serve toggle starts `kvscope serve` on a free port with the
workflow-aware prefix-store policy and a small prefix budget; the official
`openai` client sends three rounds of the `workflow` sample (planner ->
coder -> reviewer, tagged with X-KVScope-Agent/-Step headers), so the
store evicts and the panel shows why, then the first requests of the
`agent-clock` sample (a clock in the system prompt). The last request is
selected, so the panel shows where its prefix broke.
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
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

PREFIX_BUDGET_BLOCKS = 40


def requests_scene(app: Any, win: Any, out: Path, n_clock: int = 6) -> Path:
    """Serve from `win` (a model loaded), send the sample traffic, select the last request, save the PNG."""
    from kvscope.server import ServeOptions

    win.requests.policy.setCurrentText("workflow")
    bpt = win.bridge.worker.call(lambda eng: eng.model.bytes_per_token)
    # A small prefix budget, so the picture has evictions to explain (the scene only; the default is 1 GB).
    win.bridge.worker.call(lambda eng: setattr(eng.store, "budget_bytes", PREFIX_BUDGET_BLOCKS * 16 * bpt))
    win.requests.start(ServeOptions(port=0, session_budget_bytes=1))
    wait(app, lambda: win.requests.server is not None)
    done: list[object] = []
    n = send_samples(win.requests.server.base_url, n_clock, done)
    wait(app, lambda: len(done) == n and win.requests.table.rowCount() == n, 600)
    win.tabs.setCurrentWidget(win.requests)
    win.tabs.parentWidget().setSizes([330, 470])  # room for the table (the window's splitter)
    app.processEvents()
    win.requests.table.selectRow(n - 1)
    win.requests.table.scrollToBottom()
    wait(app, lambda: win.bridge.in_flight() == 0)
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)
    win.requests.table.scrollToBottom()  # once the splitter has settled
    app.processEvents()
    win.redraw()
    path = out / "requests_panel.png"
    win.grab().save(str(path))
    print(f"wrote {path}")
    win.requests.stop()
    return path


def send_samples(url: str, n_clock: int, done: list[object]) -> int:
    """From a thread: three workflow rounds tagged with agent/step headers, then the clock agent.
    Appends each response to `done`; returns how many requests it will send."""
    import openai

    from kvscope.server.samples import write_samples

    logs = {p.stem: p for p in write_samples(tempfile.mkdtemp())}
    flow = [json.loads(line) for line in logs["workflow"].read_text().splitlines()][:9]
    clock = [json.loads(line) for line in logs["agent-clock"].read_text().splitlines()][:n_clock]

    def send() -> None:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for b in flow:
            headers = {"X-KVScope-Agent": b["agent"], "X-KVScope-Step": str(b["step"])}
            done.append(
                client.chat.completions.create(
                    model="kvscope-demo", messages=b["messages"], max_tokens=8, extra_headers=headers
                )
            )
        for b in clock:
            done.append(
                client.chat.completions.create(
                    model="kvscope-demo", messages=b["messages"], max_tokens=12, temperature=0, user="clock-agent"
                )
            )

    threading.Thread(target=send, daemon=True).start()
    return len(flow) + len(clock)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--n", type=int, default=6, help="requests of the agent-clock sample")
    args = p.parse_args()
    from PySide6.QtWidgets import QApplication

    import kvscope.engine  # noqa: F401
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    bridge = EngineBridge()
    win = MainWindow(bridge)
    win.resize(1280, 800)
    win.show()
    win.load_model(None)
    wait(app, lambda: len(win.views) == 1)
    try:
        requests_scene(app, win, Path(args.out), args.n)
    finally:
        win.close()
        bridge.shutdown()
    return 0


def wait(app: Any, pred: Any, timeout_s: float = 120.0) -> None:
    t0 = time.perf_counter()
    while not pred():
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("the window did not reach the expected state in time")


if __name__ == "__main__":
    sys.exit(main())
