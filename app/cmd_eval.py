"""`kvscope eval recall`: score a model's recall/decision on held-out episodes.

Wiring only: parses arguments, loads the model (mlx_lm.load for now), builds
episodes with `kvscope.engine.tasks`, scores them with the full-cache runner
and prints one table row per context x depth.

    kvscope eval recall --model M --kind recall --context 512,2048 --depth 0.1,0.5,0.9 --n 100
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 64 for v in values):
        raise argparse.ArgumentTypeError("context lengths must be integers >= 64")
    return values


def _depths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("depths must be numbers in [0, 1]")
    return values


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `eval` (with sub-subcommand `recall`) to the CLI's subparsers."""
    from kvscope.engine.tasks import KINDS, demo_model_path

    evaluate = subparsers.add_parser("eval", help="score a model on held-out tasks")
    tasks = evaluate.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    recall = tasks.add_parser(
        "recall",
        help="recall facts / decide from fields placed in long chats",
        description="Exact-match accuracy and answer log-prob per context length x fact depth.",
    )
    recall.add_argument(
        "--model", default=str(demo_model_path()), help="model folder for mlx_lm.load (default: the bundled demo model)"
    )
    recall.add_argument("--kind", choices=KINDS, default="recall")
    recall.add_argument(
        "--context",
        type=_ints,
        default=[512, 2048],
        help="prompt lengths in tokens, comma-separated (default 512,2048)",
    )
    recall.add_argument(
        "--depth",
        type=_depths,
        default=[0.1, 0.5, 0.9],
        help="fact depths in [0, 1], comma-separated (default 0.1,0.5,0.9)",
    )
    recall.add_argument("--n", type=int, default=100, help="episodes per cell (default 100)")
    recall.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    recall.set_defaults(func=run)
    return recall


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; prints the table to stdout. Returns the exit code."""
    # kvscope.engine before mlx_lm: importing it points MLX at an optimized BLAS.
    from kvscope.engine.tasks import Cell, format_table, make_episodes, score
    from kvscope.engine.tasks.mlx_runner import MlxRunner
    from kvscope.engine.tasks.scoring import eos_ids

    if args.n < 1:
        print("kvscope eval recall: --n must be at least 1", file=sys.stderr)
        return 2
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(args.model)[:2]
    except Exception as exc:  # noqa: BLE001 - any load failure is a user-facing error
        print(f"kvscope eval recall: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 1
    runner = MlxRunner(model, eos_ids(tokenizer))
    cells: list[Cell] = []
    started = time.perf_counter()
    print(f"model: {args.model}\nkind: {args.kind}, seed {args.seed}, {args.n} episodes per cell", flush=True)
    for context in args.context:
        for depth in args.depth:
            episodes = make_episodes(args.kind, args.n, context, depth, args.seed, tokenizer)
            cells.append(Cell(args.kind, context, depth, score(episodes, runner, tokenizer)))
            print(
                f"  done context={context} depth={depth:.2f}: {cells[-1].scores.accuracy:.1%}",
                file=sys.stderr,
                flush=True,
            )
    print(format_table(cells))
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0
