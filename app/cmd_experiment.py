"""`kvscope experiment NAME`: head-to-head cache strategies with n, intervals and controls.

Wiring only; the experiments live in `kvscope.lab`:

    mask-vs-restart  compact (summary + mask) vs restart vs full cache when the
                     summary omits the answer (lab.leakage, behaviour)
    leakage          a linear probe decodes the masked number from turn n+1 (lab.leakage)
    kv-patching      share of a decision the field's own K/V vs the downstream K/V drive (lab.kv_patching)
    erratum          erratum vs overwrite vs recompute through the Engine, on the same edits
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvscope.app.common import add_model_arg, start_engine
from kvscope.engine import Engine

EXPERIMENTS = {
    "mask-vs-restart": "compact (summary + mask) vs restart vs full cache when the summary omits the answer",
    "leakage": "decode a masked number from the next turn's K/V and hidden states (Memento's probe)",
    "kv-patching": "patch a field's own K/V vs everything downstream: share of the decision each drives",
    "erratum": "appended erratum vs in-place overwrite vs full recompute after a field changes",
}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if n < 10:
        raise argparse.ArgumentTypeError("need at least 10 episodes (the probe and the intervals need them)")
    return n


def _depth(text: str) -> float:
    try:
        d = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from exc
    if not 0.0 <= d <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must be in [0, 1], got {d}")
    return d


def _context(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if n < 192:
        raise argparse.ArgumentTypeError("context must be at least 192 tokens")
    return n


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("experiment", help="head-to-head cache strategies on held-out episodes, with intervals")
    es = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name, hlp in EXPERIMENTS.items():
        q = es.add_parser(name, help=hlp, description=hlp)
        add_model_arg(q)
        q.add_argument("--n", type=_positive, default=100, help="episodes (default 100)")
        q.add_argument("--context", type=_context, default=384 if name in ("mask-vs-restart", "leakage") else 512)
        q.add_argument("--depth", type=_depth, default=0.5, help="where the fact sits in the notes, 0..1")
        q.add_argument("--seed", type=int, default=0)
        if name in ("mask-vs-restart", "leakage"):
            q.add_argument(
                "--summary",
                choices=("omits", "contains"),
                default="omits",
                help="the summary omits the asked fact (default) or contains it (sanity check)",
            )
        if name in ("leakage", "kv-patching", "erratum"):
            q.add_argument("--png", type=Path, help="also draw the result with 95%% intervals (needs matplotlib)")
        q.set_defaults(func=RUNNERS[name])


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _leakage_result(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kvscope.lab.leakage import LeakConfig, run_leakage

    eng = start_engine(args)
    config = LeakConfig(n=args.n, context=args.context, depth=args.depth, seed=args.seed, summary=args.summary)
    return eng.model, run_leakage(eng.model, config, _progress)


def _patching_result(eng: Engine, args: argparse.Namespace) -> Any:
    from kvscope.lab.kv_patching import PatchConfig, run_patching

    config = PatchConfig(n=args.n, context=args.context, depth=args.depth, seed=args.seed)
    return run_patching(eng.model, config, _progress)


def _draw(plot: Callable[[Any, Path], bool], result: Any, png: Path | None) -> None:
    """With --png, draw the result (the lab's plots need matplotlib, which is optional)."""
    if png is not None:
        print(f"\nwrote {png}" if plot(result, png) else "\n(no plot: matplotlib is not installed)")


def run_mask_vs_restart(args: argparse.Namespace) -> int:
    from kvscope.lab.experiment_report import leakage_behaviour_table

    lm, result = _leakage_result(args)
    print(
        f"\n{args.n} episodes on {lm.name}, {args.context} tokens, the summary {args.summary} the asked number; "
        "compact masks the notes after the summary was computed, restart recomputes system + summary\n"
    )
    print(leakage_behaviour_table(result))
    return 0


def run_leakage(args: argparse.Namespace) -> int:
    from kvscope.lab.experiment_report import leakage_behaviour_table, leakage_probe_table, plot_leakage

    lm, result = _leakage_result(args)
    print(
        f"\nLeakage probe on {lm.name}: {args.n} episodes, {args.context} tokens, summary {args.summary} the number\n"
    )
    print(leakage_probe_table(result))
    print()
    print(leakage_behaviour_table(result))
    _draw(plot_leakage, result, args.png)
    return 0


def run_kv_patching(args: argparse.Namespace) -> int:
    from kvscope.lab.experiment_report import patching_table, plot_patching

    eng = start_engine(args)
    result = _patching_result(eng, args)
    print(f"\nKV patching on {eng.model.name}: {len(result.outcomes)} decision episodes, {args.context} tokens\n")
    print(patching_table(result))
    _draw(plot_patching, result, args.png)
    return 0


def run_erratum(args: argparse.Namespace) -> int:
    from kvscope.lab.experiment_report import patching_table, plot_patching, tally_table
    from kvscope.lab.experiments import erratum_vs_overwrite

    eng = start_engine(args)
    patched = _patching_result(eng, args)
    episodes = [p.episode for p in patched.pairs]
    tallies = erratum_vs_overwrite(eng, episodes, [p.new_value for p in patched.pairs])
    print(
        f"\nErratum on {eng.model.name}: {len(episodes)} decision episodes, {args.context} tokens; "
        "accuracy = the corrected verdict, through the Engine (greedy reply)\n"
    )
    print(tally_table(tallies))
    print("\nThe same edits as causal shares of the decision (overwrite span = 'field, all layers'):\n")
    print(patching_table(patched))
    _draw(plot_patching, patched, args.png)
    return 0


RUNNERS = {
    "mask-vs-restart": run_mask_vs_restart,
    "leakage": run_leakage,
    "kv-patching": run_kv_patching,
    "erratum": run_erratum,
}
