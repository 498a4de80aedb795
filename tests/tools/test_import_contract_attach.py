"""The attach contract can fail: kvscope.attach importing the window breaks it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from lint_imports import run  # noqa: E402


def test_attach_importing_the_window_breaks_its_contract(tmp_path: Path) -> None:
    for extra in ROOT.iterdir():
        if extra.is_dir() and (extra / "__init__.py").exists():
            shutil.copytree(extra, tmp_path / extra.name, ignore=shutil.ignore_patterns("models", "__pycache__"))
    fleet = tmp_path / "attach" / "fleet.py"
    fleet.write_text("from kvscope.ui.block_map import BlockMap  # noqa\n" + fleet.read_text())
    res = run(tmp_path, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert "kvscope.attach.fleet -> kvscope.ui.block_map" in res.stdout
