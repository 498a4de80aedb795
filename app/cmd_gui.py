"""`kvscope gui`: open the window (the same as `kvscope` with no command)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from kvscope.app.gui import build_parser

    p = subparsers.add_parser("gui", help="open the window", description="Open the kvscope window.")
    build_parser(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvscope.app.gui import launch_from_args

    return launch_from_args(args)
