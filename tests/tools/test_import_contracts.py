"""The import contracts can fail: a planted violation in a copy of the tree breaks them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from lint_imports import run  # noqa: E402


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for folder in ("engine", "ui", "app", "assets"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("models", "__pycache__"))
    for extra in ROOT.iterdir():  # packages added later (server, attach, lab, ...) come along
        if extra.is_dir() and (extra / "__init__.py").exists() and not (tmp_path / extra.name).exists():
            shutil.copytree(extra, tmp_path / extra.name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(path: Path, line: str) -> None:
    path.write_text(line + "\n" + path.read_text())


def test_the_real_tree_keeps_every_contract() -> None:
    res = run(ROOT, ROOT / "pyproject.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" in res.stdout and " 0 broken" in res.stdout


def test_the_engine_importing_the_window_breaks_the_contract(tree: Path) -> None:
    _plant(tree / "engine" / "blocks.py", "from kvscope.ui.palette import state_lut  # noqa")
    res = run(tree, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert "kvscope.engine.blocks -> kvscope.ui.palette" in res.stdout


def test_the_engine_importing_qt_breaks_the_contract(tree: Path) -> None:
    _plant(tree / "engine" / "session.py", "import PySide6.QtCore  # noqa")
    res = run(tree, ROOT / "pyproject.toml")
    assert res.returncode != 0 and "PySide6" in res.stdout


def test_the_window_importing_the_command_line_breaks_the_layers(tree: Path) -> None:
    _plant(tree / "ui" / "palette.py", "import kvscope.app.cli  # noqa")
    res = run(tree, ROOT / "pyproject.toml")
    assert res.returncode != 0 and "kvscope.ui.palette -> kvscope.app.cli" in res.stdout


def test_the_cache_reaching_up_to_the_engine_parts_breaks_the_engine_layers(tree: Path) -> None:
    _plant(tree / "engine" / "kv_cache.py", "import kvscope.engine.transaction  # noqa")
    res = run(tree, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert "Inside the engine" in res.stdout and "kvscope.engine.kv_cache -> kvscope.engine.transaction" in res.stdout
