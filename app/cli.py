"""The `kvscope` command: argparse wiring only; the work is in kvscope.engine.

`kvscope` with no subcommand opens the window on the demo model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvscope.app import cmd_chat


def _command_modules() -> list:  # type: ignore[type-arg]
    mods = [cmd_chat]
    for name in ("cmd_eval", "cmd_surgery", "cmd_segment", "cmd_bench", "cmd_gui", "cmd_serve", "cmd_replay"):
        try:
            mods.append(__import__(f"kvscope.app.{name}", fromlist=["register"]))
        except ModuleNotFoundError as exc:
            if exc.name != f"kvscope.app.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvscope",
        description="A lab for the KV cache of language models. Without a command, opens the window.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from kvscope.app.gui import run_gui

        return run_gui([])
    from kvscope.engine.errors import KVScopeError

    try:
        return int(args.func(args) or 0)
    except KVScopeError as exc:
        print(f"kvscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
