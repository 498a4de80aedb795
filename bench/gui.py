"""Window benchmarks, measured in one run (offscreen):

1. block-map redraw: `setImage` + a synchronous repaint of a 32 layers x 8192
   blocks map (p50/p95 ms, and the share of a 16.7 ms frame);
2. decode speed with the window attached / headless (same engine, same
   prompt, alternating runs, median of each), plus the longest event-loop
   stall seen while the window was attached.

    python bench/gui.py [--model DIR] [--tokens 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

FRAME_MS = 1000 / 60


def bench_block_map(app: object, layers: int = 32, blocks: int = 8192, frames: int = 120) -> dict[str, float]:
    import numpy as np

    from kvscope.engine.blocks import N_STATES
    from kvscope.ui.block_map import BlockMap

    rng = np.random.default_rng(0)
    bm = BlockMap()
    bm.resize(1400, 360)
    bm.show()
    states = rng.integers(0, N_STATES, size=(layers, blocks), dtype=np.uint8)
    bm.set_states(states)
    app.processEvents()  # type: ignore[attr-defined]
    times = []
    for i in range(frames):
        states[:, (i * 37) % blocks] = i % N_STATES  # a streaming-like change
        t0 = time.perf_counter()
        bm.set_states(states)
        bm.viewport().repaint()
        times.append((time.perf_counter() - t0) * 1000)
    bm.close()
    p50, p95 = float(np.percentile(times, 50)), float(np.percentile(times, 95))
    return {"p50_ms": p50, "p95_ms": p95, "p50_frame": p50 / FRAME_MS, "p95_frame": p95 / FRAME_MS}


def _wait(app: object, pred: object, timeout_s: float = 300) -> None:
    t0 = time.perf_counter()
    while not pred():  # type: ignore[operator]
        app.processEvents()  # type: ignore[attr-defined]
        time.sleep(0.001)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError


def bench_decode(app: object, model: str | None, n_tokens: int, repeats: int) -> dict[str, float]:
    from kvscope.engine.generation import SamplingParams
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow
    from kvscope.ui.stall import StallMeter

    bridge = EngineBridge()
    win = MainWindow(bridge)
    win.resize(1500, 950)
    win.show()
    win.load_model(model)
    _wait(app, lambda: win.active_view() is not None and win.active_view().snapshot is not None)
    prompt = "Tell me a long story about the red door and the locker code."
    params = SamplingParams(max_tokens=n_tokens, temperature=0.8, seed=1)  # sampled: no early EOS loops
    headless, attached, stalls = [], [], []
    for _ in range(repeats):
        sid = bridge.worker.call(lambda e: e.new_session("headless"))
        r = bridge.worker.call(lambda e, s=sid: e.chat(s, prompt, params))
        headless.append(r.stats.decode_tps)
        bridge.worker.call(lambda e, s=sid: e.close_session(s))
        _wait(app, lambda: bridge.in_flight() == 0)
        for old in list(win.views):  # a fresh session per run: same prompt length
            win.close_session(old)
        _wait(app, lambda: not win.views)
        win.new_session("window")
        _wait(app, lambda: win.active_view() is not None and win.active_view().snapshot is not None)
        view = win.active_view()
        view.max_tokens.setValue(n_tokens)
        view.temperature.setValue(0.8)
        view.seed.setValue(1)
        meter = StallMeter(5)
        meter.start()
        view.send(prompt)
        _wait(app, lambda v=view: not v.generating)
        stalls.append(meter.stop())
        attached.append(bridge.worker.call(lambda e, s=view.sid: e.session(s).turns[-1].decode_tps))
    info = bridge.worker.call(lambda e: e.info())
    win.close()
    bridge.shutdown()
    h, a = statistics.median(headless), statistics.median(attached)
    return {"model": info.get("model"), "headless_tps": h, "window_tps": a, "ratio": a / h, "max_stall_ms": max(stalls)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from PySide6.QtWidgets import QApplication

    import kvscope.engine  # noqa: F401

    app = QApplication.instance() or QApplication(sys.argv[:1])
    bm = bench_block_map(app)
    print(
        f"block map 32x8192 redraw: p50 {bm['p50_ms']:.2f} ms ({bm['p50_frame']:.0%} of a 16.7 ms frame), "
        f"p95 {bm['p95_ms']:.2f} ms ({bm['p95_frame']:.0%})"
    )
    d = bench_decode(app, args.model, args.tokens, args.repeats)
    print(
        f"decode on {d['model']}: headless {d['headless_tps']:.1f} tok/s, window attached {d['window_tps']:.1f} tok/s, "
        f"ratio {d['ratio']:.3f}; longest event-loop stall {d['max_stall_ms']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
