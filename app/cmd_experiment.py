"""`kvscope experiment mask-vs-restart` and `kvscope experiment erratum`."""

from __future__ import annotations

import argparse

from kvscope.app.common import add_model_arg, start_engine
from kvscope.engine.tasks import make_episodes
from kvscope.lab.experiments import Tally, erratum_vs_overwrite, mask_vs_restart


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("experiment", help="head-to-head cache strategies on held-out episodes")
    es = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name, hlp, fn in [
        ("mask-vs-restart", "compact (summary + mask + continue) vs restart from the summary", run_mask_vs_restart),
        ("erratum", "appended erratum vs in-place overwrite vs full recompute after a field changes", run_erratum),
    ]:
        q = es.add_parser(name, help=hlp)
        add_model_arg(q)
        q.add_argument("--kind", choices=("recall", "decision"), default="decision" if name == "erratum" else "recall")
        q.add_argument("--context", type=int, default=512, help="context tokens per episode")
        q.add_argument("--depth", type=float, default=0.5)
        q.add_argument("--n", type=int, default=20)
        q.add_argument("--seed", type=int, default=1)
        if name == "mask-vs-restart":
            q.add_argument("--generated-summary", action="store_true", help="let the model write the summary")
        q.set_defaults(func=fn)


def _table(title: str, rows: list[Tally]) -> None:
    print(title)
    print(f"{'strategy':>16} {'accuracy':>9} {'TTFT ms':>9} {'prefilled':>10}")
    for r in rows:
        print(f"{r.name:>16} {r.accuracy:9.0%} {r.median_ttft_ms:9.1f} {r.mean_prefilled:10.1f}")


def run_mask_vs_restart(args: argparse.Namespace) -> int:
    eng = start_engine(args)
    eps = make_episodes(args.kind, args.n, args.context, args.depth, args.seed, eng.model.tokenizer)
    rows = mask_vs_restart(eng, eps, args.generated_summary)
    summary = "model-written" if args.generated_summary else "the fact line (a perfect typed summary)"
    _table(f"{args.n} {args.kind} episodes, {args.context} tokens, summary = {summary}", rows)
    return 0


def run_erratum(args: argparse.Namespace) -> int:
    eng = start_engine(args)
    eps = make_episodes("decision", args.n, args.context, args.depth, args.seed, eng.model.tokenizer)
    _table(
        f"{args.n} decision episodes, {args.context} tokens; accuracy = the corrected decision",
        erratum_vs_overwrite(eng, eps),
    )
    return 0
