"""The engine-never-imports-the-lab contract holds on the real tree and breaks on a planted import."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from lint_imports import run  # noqa: E402


def test_the_engine_importing_the_lab_breaks_the_contract(tmp_path: Path) -> None:
    # Every package pyproject maps (server, lab, ...), the demo model's weights left out.
    for folder in [d for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").exists()]:
        shutil.copytree(folder, tmp_path / folder.name, ignore=shutil.ignore_patterns("models", "__pycache__"))
    (tmp_path / "assets").mkdir(exist_ok=True)
    blocks = tmp_path / "engine" / "blocks.py"
    blocks.write_text("from kvscope.lab import stats  # noqa\n" + blocks.read_text())
    res = run(tmp_path, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert (
        "The engine never imports the lab" in res.stdout and "kvscope.engine.blocks -> kvscope.lab.stats" in res.stdout
    )
