"""Helpers every subcommand shares: the --model option and engine start-up."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from kvscope.engine import Engine, EngineConfig, SamplingParams, demo_model_path
from kvscope.engine.events import SessionId


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


def add_kv_events_args(p: argparse.ArgumentParser) -> None:
    """--kv-events: the engine publishes its block events in vLLM's format (docs/attach.md)."""
    p.add_argument(
        "--kv-events",
        metavar="ENDPOINT",
        help="publish block events as vLLM KV events on this ZMQ endpoint (binds if it has '*', else connects)",
    )
    p.add_argument("--kv-events-replay", metavar="ENDPOINT", help="ZMQ ROUTER endpoint for replay requests")
    p.add_argument("--kv-events-topic", default="kv@kvscope", metavar="TOPIC", help="topic of the messages")


def kv_events_config(args: argparse.Namespace) -> dict[str, str | None]:
    """The EngineConfig fields for the --kv-events options."""
    return {
        "kv_events": args.kv_events,
        "kv_events_replay": args.kv_events_replay,
        "kv_events_topic": args.kv_events_topic,
    }


def token_span(text: str) -> tuple[int, int]:
    """argparse type for a token span `LO:HI`."""
    try:
        lo, hi = text.split(":")
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"span must be LO:HI (token indices), got {text!r}") from None


def chat_with_system(eng: Engine, system: str | None) -> SessionId:
    """A session whose system prompt is already in the cache (so spans can target it)."""
    sid = eng.new_session()
    if system:
        eng.append_message(sid, "system", system)
    return sid


def print_report(label: str, rep: Any) -> None:
    """One line per operation on stderr: `[label] <the report's summary>`."""
    print(f"[{label}] {rep.summary()}", file=sys.stderr)


def ask(eng: Engine, sid: SessionId, question: str | None) -> None:
    """Ask `question` (if any) in the session; the answer on stdout, its timing on stderr."""
    if question:
        res = eng.chat(sid, question, SamplingParams(max_tokens=64))
        print(res.text)
        print(
            f"[answer] ttft {res.stats.ttft_ms:.1f} ms, prefilled {res.stats.prefilled_tokens} tokens", file=sys.stderr
        )
