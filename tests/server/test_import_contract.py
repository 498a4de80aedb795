"""The server's import contracts can fail: planted violations in a copy of the tree break them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from lint_imports import run  # noqa: E402


def _tree(tmp: Path) -> Path:
    # Every package pyproject maps (lab, ...), or its contracts name modules that are missing.
    for folder in [d for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").exists()]:
        shutil.copytree(folder, tmp / folder.name, ignore=shutil.ignore_patterns("models", "__pycache__"))
    return tmp


def _plant(path: Path, line: str) -> None:
    path.write_text(line + "\n" + path.read_text())


def test_server_importing_the_window_and_engine_importing_the_server_break_contracts(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    _plant(tree / "server" / "shapes.py", "import kvscope.ui.palette  # noqa")
    _plant(tree / "engine" / "blocks.py", "import starlette  # noqa")
    res = run(tree, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert "kvscope.server.shapes -> kvscope.ui.palette" in res.stdout
    assert "kvscope.engine.blocks -> starlette" in res.stdout
