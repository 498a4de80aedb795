"""`kvscope bench compression`: wiring only; the work is in kvscope.lab.compression_bench."""

from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial
from pathlib import Path

from kvscope.app.common import add_model_arg, start_engine


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    c = bench_sub.add_parser(
        "compression",
        help="recall accuracy, answer log-prob, KL, bytes and decode speed of every compression policy",
    )
    add_model_arg(c)
    c.add_argument("--policies", nargs="+", help="policies to run (default: all eviction policies)")
    c.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5, 0.25, 0.125], help="keep ratios")
    c.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048], help="context lengths in tokens")
    c.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="fact depths in [0, 1]")
    c.add_argument("-n", "--episodes", type=int, default=6, help="episodes per (context, depth)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--mode",
        choices=["context", "question", "both"],
        default="both",
        help="context: compress before the question (query-agnostic); question: compress with it",
    )
    c.add_argument("--kind", choices=["recall", "decision"], default="recall", help="episode kind")
    c.add_argument("--no-quant", action="store_true", help="skip the 8/4-bit quantization rows")
    c.add_argument("--out", default="docs/compression.md", help="markdown report to write")
    c.add_argument("--png", default=None, help="plot to write (default: the report's name with .png)")
    c.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    parts = ["kvscope", "bench", "compression"]
    if args.model:
        parts += ["--model", args.model]
    parts += ["--contexts", *map(str, args.contexts), "--depths", *map(str, args.depths), "-n", str(args.episodes)]
    parts += ["--ratios", *map(str, args.ratios), "--mode", args.mode, "--seed", str(args.seed)]
    if args.policies:
        parts += ["--policies", *args.policies]
    if args.no_quant:
        parts.append("--no-quant")
    if args.kind != "recall":
        parts += ["--kind", args.kind]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    from kvscope.engine.policies import POLICIES
    from kvscope.lab.compression_bench import BenchConfig, run_benchmark, summarize
    from kvscope.lab.compression_report import format_table, headline, write_report

    policies = tuple(args.policies or [n for n, cls in POLICIES.items() if cls.evicts])
    unknown = [p for p in policies if p not in POLICIES or not POLICIES[p].evicts]
    if unknown:
        print(f"kvscope: error: not an eviction policy: {', '.join(unknown)}", file=sys.stderr)
        return 2
    eng = start_engine(args)
    lm = eng.model
    modes = ["context", "question"] if args.mode == "both" else [args.mode]
    tables = {}
    seconds = 0.0
    config = None
    for mode in modes:
        config = BenchConfig(
            policies=policies,
            ratios=tuple(args.ratios),
            contexts=tuple(args.contexts),
            depths=tuple(args.depths),
            n_per_cell=args.episodes,
            seed=args.seed,
            mode=mode,
            quant_bits=() if args.no_quant else (8, 4),
            combined="snapkv" if "snapkv" in policies else None,
            kind=args.kind,
        )
        result = run_benchmark(lm, config, partial(_say, mode))
        seconds += result.seconds
        rows = summarize(result)
        tables[mode] = rows
        print(f"\n{mode} mode — {lm.name}\n{format_table(rows, config)}\n{headline(rows)}\n")
    assert config is not None
    out = Path(args.out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    drawn = write_report(tables, config, lm.name, seconds, out, png, _command(args))
    print(f"wrote {out}" + (f" and {png}" if drawn else " (no plot: matplotlib missing)"))
    return 0


def _say(mode: str, text: str) -> None:
    print(f"[{mode}] {text}", file=sys.stderr, flush=True)
