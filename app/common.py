"""Helpers every subcommand shares: the --model option and engine start-up."""

from __future__ import annotations

import argparse
import math
import sys

from kvscope.engine import Engine, EngineConfig, demo_model_path


def memory_budget_mb(text: str) -> float:
    """argparse type for --memory-budget: a finite number of MB above zero."""
    try:
        mb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None
    if not math.isfinite(mb) or mb <= 0 or mb * 1024 * 1024 < 1:
        raise argparse.ArgumentTypeError(f"the memory budget must be a positive, finite number of MB, got {text!r}")
    return mb


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
