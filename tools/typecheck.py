"""Run mypy on source folders under their installed names (`kvscope.ui`, ...).

Run over `ui/` straight from the repository, mypy sees every `kvscope.*`
import as `Any` (the editable install maps `kvscope.ui` -> `ui/` through an
import hook mypy cannot walk), so a wrong call into the engine or between
two ui modules passes unseen. This checks the packages in the same
throwaway tree `tools/lint_imports.py` builds, so each module is checked
against the others' real types. Modules only imported (not named here) are
followed silently (pyproject's mypy overrides): their own errors are their
own check's business.

    python tools/typecheck.py [PACKAGE ...]     default: ui; exit code of mypy
    (`ui` checks the package kvscope.ui; `ui.naming` only the module kvscope.ui.naming)

Paths in the output are the repository's (`ui/x.py`), not the tree's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from lint_imports import HERE, installed_tree


def run(packages: list[str], root: Path = HERE) -> subprocess.CompletedProcess[str]:
    config = HERE / "pyproject.toml"
    with installed_tree(root, config) as tmp:
        mypy = Path(sys.executable).with_name("mypy")
        args = [str(mypy), "--config-file", str(config), "--cache-dir", str(HERE / ".mypy_cache" / "installed")]
        for name in packages:
            args += ["-m" if "." in name else "-p", f"kvscope.{name}"]
        res = subprocess.run(args, cwd=tmp, env=dict(os.environ, MYPYPATH=tmp), capture_output=True, text=True)
    # kvscope/ui/x.py -> ui/x.py (every package folder sits at the root under its last name)
    res.stdout = re.sub(r"^kvscope/(\w+)/", r"\1/", res.stdout, flags=re.M)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("packages", nargs="*", default=["ui"], help="kvscope packages to check (default: ui)")
    args = p.parse_args()
    res = run(args.packages)
    print(res.stdout + res.stderr, end="")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
