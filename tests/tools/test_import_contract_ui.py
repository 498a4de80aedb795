"""The window-layers contract can fail: a part importing what holds it (the old
import circles: SpanActions -> SessionView, FileActions -> MainWindow) breaks it,
even when the import is only for type checking."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from lint_imports import run  # noqa: E402

FUTURE = "from __future__ import annotations\n"


def _plant(path: Path, module: str, name: str) -> None:
    planted = f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from {module} import {name}\n"
    path.write_text(path.read_text().replace(FUTURE, FUTURE + planted, 1))


def test_a_part_importing_what_holds_it_breaks_the_window_layers(tmp_path: Path) -> None:
    for extra in ROOT.iterdir():
        if extra.is_dir() and (extra / "__init__.py").exists():
            shutil.copytree(extra, tmp_path / extra.name, ignore=shutil.ignore_patterns("models", "__pycache__"))
    _plant(tmp_path / "ui" / "span_actions.py", "kvscope.ui.session_view", "SessionView")
    _plant(tmp_path / "ui" / "file_actions.py", "kvscope.ui.main_window", "MainWindow")
    res = run(tmp_path, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert "kvscope.ui.span_actions -> kvscope.ui.session_view" in res.stdout
    assert "kvscope.ui.file_actions -> kvscope.ui.main_window" in res.stdout
