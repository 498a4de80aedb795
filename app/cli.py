"""The `kvscope` command: argparse wiring only; the work is in kvscope.engine.

`kvscope` with no subcommand opens the window on the demo model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvscope.app import (
    cmd_attach,
    cmd_bench,
    cmd_chat,
    cmd_eval,
    cmd_experiment,
    cmd_gui,
    cmd_replay,
    cmd_segment,
    cmd_serve,
    cmd_surgery,
)

# Every subcommand module, in the order `kvscope --help` lists them. An import
# error is a bug to see, not a command to hide.
COMMAND_MODULES = (
    cmd_chat,
    cmd_eval,
    cmd_surgery,
    cmd_segment,
    cmd_experiment,
    cmd_bench,
    cmd_gui,
    cmd_serve,
    cmd_replay,
    cmd_attach,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvscope",
        description="A lab for the KV cache of language models. Without a command, opens the window.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
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
