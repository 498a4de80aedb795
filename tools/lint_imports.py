"""Run import-linter on the source folders under their installed names.

The folders sit at the repository root (`engine/`, `ui/`, `app/`, ...) and
install as `kvscope.engine`, `kvscope.ui`, ... through setuptools'
`package-dir`; an editable install hides that mapping behind an import hook
that import-linter cannot walk. So this builds a throwaway tree
`<tmp>/kvscope/<name> -> <root>/<folder>` from pyproject's `package-dir`
and runs `lint-imports` on it, with pyproject's contracts.

    python tools/lint_imports.py [--root DIR]      exit code of lint-imports
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def installed_tree(root: Path, config: Path) -> Iterator[str]:
    """A throwaway folder where `kvscope/<name>` links to `root/<folder>` (pyproject's package-dir)."""
    line = re.search(r"^package-dir = \{(.*)\}$", config.read_text(), re.M)
    assert line, "pyproject.toml has no one-line package-dir table"
    package_dir = dict(re.findall(r'"([\w.]+)" = "([\w./-]+)"', line.group(1)))
    with tempfile.TemporaryDirectory(prefix="kvscope-lint-") as tmp:
        for name, folder in package_dir.items():
            link = Path(tmp, *name.split("."))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((root / folder).resolve(), target_is_directory=True)
        yield tmp


def run(root: Path, config: Path) -> subprocess.CompletedProcess[str]:
    with installed_tree(root, config) as tmp:
        env = dict(os.environ, PYTHONPATH=tmp)
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run([str(lint), str(config), "--no-cache"], cwd=tmp, env=env, capture_output=True, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=HERE, help="source tree to check (default: this repository)")
    args = p.parse_args()
    res = run(args.root, HERE / "pyproject.toml")
    print(res.stdout + res.stderr, end="")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
