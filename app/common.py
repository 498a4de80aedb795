"""Helpers every subcommand shares: the --model option and engine start-up."""

from __future__ import annotations

import argparse
import sys

from kvscope.engine import Engine, EngineConfig, demo_model_path


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="model folder or hub id (default: the bundled demo model)")


def start_engine(args: argparse.Namespace, config: EngineConfig | None = None) -> Engine:
    """An engine with the model loaded; says so when it falls back to the demo model."""
    eng = Engine(config)
    if getattr(args, "model", None):
        eng.load(args.model)
    else:
        print(f"kvscope: no --model given, using the bundled demo model ({demo_model_path()})", file=sys.stderr)
        eng.load(None)
    return eng
