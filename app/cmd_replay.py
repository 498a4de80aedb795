"""`kvscope replay`: wiring only; the work is in kvscope.server.replay."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kvscope.app.common import add_model_arg, start_engine
from kvscope.engine import Engine

_MB = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "replay",
        help="replay a log of OpenAI requests through the prefix store: hit rate per eviction policy, misses by cause",
    )
    p.add_argument("log", nargs="?", help="JSON-lines request bodies (what `kvscope serve --record` writes)")
    p.add_argument("--sample", choices=("agent-clock", "workflow"), help="replay a sample log kvscope generates")
    p.add_argument("--write-samples", metavar="DIR", help="write the sample logs to DIR and exit")
    add_model_arg(p)
    p.add_argument("--budget-mb", type=float, help="prefix-store budget in MB (default: unlimited)")
    p.add_argument("--policy", default="lru,hot,workflow", help="comma-separated eviction policies to compare")
    p.add_argument("--block-size", type=int, default=16)
    p.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    from kvscope.engine.errors import InvalidRequestError
    from kvscope.server.replay import POLICIES, ReplayError, format_report, replay_file
    from kvscope.server.samples import write_samples

    if args.write_samples:
        for path in write_samples(args.write_samples):
            print(path)
        return 0
    if bool(args.log) == bool(args.sample):
        raise InvalidRequestError("give a log file or --sample NAME (not both)")
    policies = tuple(p.strip() for p in args.policy.split(",") if p.strip())
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise InvalidRequestError(f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICIES)}")
    if args.block_size < 1 or (args.budget_mb is not None and args.budget_mb <= 0):
        raise InvalidRequestError("--block-size and --budget-mb must be positive")
    path = Path(args.log) if args.log else _sample(args.sample)
    eng = start_engine(args)
    ms_per_token = _prefill_ms_per_token(eng)
    budget = int(args.budget_mb * _MB) if args.budget_mb else None
    try:
        report = replay_file(eng.model, path, policies, budget, args.block_size, ms_per_token)
    except ReplayError as exc:
        raise InvalidRequestError(str(exc)) from exc
    print(f"replay of {path}:")
    print(format_report(report))
    return 0


def _sample(name: str) -> Path:
    from kvscope.server.samples import write_samples

    folder = Path(tempfile.mkdtemp(prefix="kvscope-samples-"))
    return next(p for p in write_samples(folder) if p.stem == name)


def _prefill_ms_per_token(eng: Engine, n: int = 256) -> float:
    """The loaded model's prefill speed on this machine, measured on `n` tokens."""
    from kvscope.engine import SamplingParams
    from kvscope.engine.prompt_turn import run_prompt

    vocab = int(eng.model.config.get("vocab_size", n + 10))
    ids = [5 + i % max(vocab - 5, 1) for i in range(n)]
    sid = eng.new_session("prefill speed")
    try:
        r = run_prompt(eng, sid, ids, SamplingParams(max_tokens=1), [], "", lambda: False)
    finally:
        eng.close_session(sid)
    ms = r.stats.ttft_ms / max(r.stats.prefilled_tokens, 1)
    print(f"measured prefill: {1000 / ms:.0f} tokens/s", file=sys.stderr)
    return ms
