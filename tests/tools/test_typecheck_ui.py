"""tools/typecheck.py sees the real types across packages: a wrong type coming
from the engine fails it (plain `mypy ui` sees every kvscope import as Any)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from typecheck import run  # noqa: E402

PLANTED = """

def _planted() -> int:
    from kvscope.engine.events import SessionId

    return SessionId("s1")  # a str NewType where an int is promised
"""


def test_a_wrong_type_from_the_engine_fails_the_ui_check(tmp_path: Path) -> None:
    for folder in ("engine", "ui"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    naming = tmp_path / "ui" / "naming.py"
    naming.write_text(naming.read_text() + PLANTED)
    res = run(["ui.naming"], root=tmp_path)  # one module: the check of the whole package takes longer
    assert res.returncode != 0
    assert (
        "ui/naming.py:" in res.stdout
        and 'Incompatible return value type (got "SessionId", expected "int")' in res.stdout
    )
