"""The window's launcher: QApplication, bridge, main window, demo model.

Wiring only; the window lives in kvscope.ui, the engine in kvscope.engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kvscope.app.common import memory_budget_mb


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="kvscope gui", description="Open the kvscope window.")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the bundled demo model)")
    parser.add_argument(
        "--quit-after-ms",
        type=int,
        default=int(os.environ.get("KVSCOPE_QUIT_AFTER_MS", "0")),
        help="close the window by itself after this many ms (smoke tests; env KVSCOPE_QUIT_AFTER_MS)",
    )
    parser.add_argument("--prompt", default=None, help="send this message in the first session once loaded")
    parser.add_argument("--no-persist", action="store_true", help="do not save or reopen sessions")
    parser.add_argument("--data-dir", help="where sessions are saved (default: KVSCOPE_HOME or the user data folder)")
    parser.add_argument(
        "--memory-budget", type=memory_budget_mb, help="cap on cache memory in MB (default: half the RAM)"
    )
    return parser


def run_gui(argv: Sequence[str]) -> int:
    """Open the window; returns the Qt exit code."""
    return launch_from_args(build_parser().parse_args(list(argv)))


def launch_from_args(args: argparse.Namespace) -> int:
    config = {
        "persist": not args.no_persist,
        "data_dir": args.data_dir,
        "memory_budget_bytes": int(args.memory_budget * 1024 * 1024) if args.memory_budget is not None else None,
    }
    return launch(args.model, args.quit_after_ms, args.prompt, config)


def launch(
    model: str | None,
    quit_after_ms: int = 0,
    prompt: str | None = None,
    config: dict | None = None,
    serve: object | None = None,
) -> int:
    """Open the window; with `serve` (kvscope.server.ServeOptions) it also serves the OpenAI API."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    import kvscope.engine  # noqa: F401 - the BLAS preload must precede mlx
    from kvscope.ui.bridge import EngineBridge
    from kvscope.ui.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("kvscope")
    from kvscope.engine import EngineConfig

    bridge = EngineBridge(EngineConfig.from_dict(config or {}))
    window = MainWindow(bridge)
    window.show()
    window.load_model(model)
    if serve is not None:
        window.requests.start(serve)  # type: ignore[arg-type]  # queues behind the model load
    if prompt:
        _send_when_ready(window, prompt)
    if quit_after_ms > 0:
        QTimer.singleShot(quit_after_ms, window.close)
    try:
        code = app.exec()
    finally:
        bridge.shutdown()
    print(f"kvscope: window closed (model {window.model_name or 'none'})", file=sys.stderr)
    return int(code)


def _send_when_ready(window: object, prompt: str) -> None:
    from PySide6.QtCore import QTimer

    def attempt() -> None:
        view = window.active_view()  # type: ignore[attr-defined]
        if view is None:
            QTimer.singleShot(100, attempt)
        else:
            view.send(prompt)

    QTimer.singleShot(100, attempt)
