"""The window's parts contract can fail: a part importing its view (the old import circle) breaks it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from lint_imports import run  # noqa: E402


def test_span_actions_importing_its_view_breaks_the_contract(tmp_path: Path) -> None:
    for extra in ROOT.iterdir():
        if extra.is_dir() and (extra / "__init__.py").exists():
            shutil.copytree(extra, tmp_path / extra.name, ignore=shutil.ignore_patterns("models", "__pycache__"))
    actions = tmp_path / "ui" / "span_actions.py"
    # Even an import only for type checking closes the circle the contract forbids.
    planted = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvscope.ui.session_view import SessionView\n"
    )
    future = "from __future__ import annotations\n"
    actions.write_text(actions.read_text().replace(future, future + planted, 1))
    res = run(tmp_path, ROOT / "pyproject.toml")
    assert res.returncode != 0
    assert "kvscope.ui.span_actions -> kvscope.ui.session_view" in res.stdout
