"""Shared bench helpers: pick the model, build a random stand-in, time things.

Every bench prints ratios measured side by side in one run (the machine is
shared and noisy); absolute times are printed for context only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import kvscope.engine  # noqa: E402,F401  - BLAS preload before mlx
from kvscope.engine import demo_model_path  # noqa: E402


def model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (default: the demo model, else a random 8-layer llama)")


def resolve_model(arg: str | None, layers: int = 8, hidden: int = 512) -> str:
    if arg:
        return arg
    demo = demo_model_path()
    if (demo / "config.json").exists():
        return str(demo)
    from tiny_models import make_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="kvscope-bench-")) / "random-llama"
    make_tiny_model(
        folder,
        "llama",
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=16384,
    )
    print(f"(no demo model found: using a random {layers}-layer llama, hidden {hidden})", file=sys.stderr)
    return str(folder)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def med(xs: list[float]) -> float:
    return statistics.median(xs)
