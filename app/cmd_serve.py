"""`kvscope serve`: wiring only; the server is kvscope.server, the work kvscope.engine."""

from __future__ import annotations

import argparse
import os
import sys

from kvscope.app.common import add_kv_events_args, add_model_arg, kv_events_config, memory_budget_mb
from kvscope.engine.prefix_policy import POLICIES

_MB = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server on the engine; every request becomes an inspectable session",
    )
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key", default=os.environ.get("KVSCOPE_API_KEY"), help="require this bearer key (env KVSCOPE_API_KEY)"
    )
    p.add_argument("--record", metavar="LOG.jsonl", help="append every request body to this JSON-lines file")
    p.add_argument("--gui", action="store_true", help="open the window with its Requests panel, serving from it")
    p.add_argument(
        "--memory-budget", type=memory_budget_mb, metavar="MB", help="cap on cache memory (default: half the RAM)"
    )
    p.add_argument(
        "--session-budget",
        type=float,
        metavar="MB",
        help="cap on the request sessions' cache; the least recently used unpinned ones are closed past it",
    )
    p.add_argument(
        "--prefix-policy",
        choices=POLICIES,
        default="lru",
        help="prefix-store eviction: lru, hot (keep the most reused), workflow (keep the agent that runs next; "
        "agents and steps from X-KVScope-Agent/-Step headers or metadata.agent/step)",
    )
    p.add_argument(
        "--prefix-budget", type=_prefix_mb, metavar="MB", help="cap on the prefix store's blocks (default 1024)"
    )
    p.add_argument(
        "--stream-interval",
        type=_interval_ms,
        default=20.0,
        metavar="MS",
        help="a stream sends its new text at most this often, the first piece at once (default 20; 0: every token)",
    )
    add_kv_events_args(p)
    p.set_defaults(func=run_serve)


def _prefix_mb(text: str) -> float:
    try:
        return memory_budget_mb(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"the prefix budget must be a positive number of MB, got {text!r}") from None


def _interval_ms(text: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 <= ms <= 1000:
        raise argparse.ArgumentTypeError(f"the stream interval must be 0-1000 ms, got {text}")
    return ms


def run_serve(args: argparse.Namespace) -> int:
    from kvscope.server import ServeOptions

    options = ServeOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        record=args.record,
        session_budget_bytes=int(args.session_budget * _MB) if args.session_budget else None,
        model_alias=args.model,
        log_level="info",
        stream_interval_ms=args.stream_interval,
    )
    config = {
        "memory_budget_bytes": int(args.memory_budget * _MB) if args.memory_budget is not None else None,
        "prefix_policy": args.prefix_policy,
        **({"prefix_budget_bytes": int(args.prefix_budget * _MB)} if args.prefix_budget is not None else {}),
        **kv_events_config(args),
    }
    if args.gui:
        from kvscope.app.gui import launch

        return launch(args.model, config=dict(config, persist=False), serve=options)
    return _serve_headless(args, options, config)


def _serve_headless(args: argparse.Namespace, options: object, config: dict) -> int:
    from kvscope.engine import EngineConfig, demo_model_path
    from kvscope.engine.worker import EngineWorker
    from kvscope.server import Server

    worker = EngineWorker(EngineConfig.from_dict(config))
    try:
        if not args.model:
            print(f"kvscope: no --model given, using the bundled demo model ({demo_model_path()})", file=sys.stderr)
        worker.call(lambda eng: eng.load(args.model))
        server = Server(worker, options)  # type: ignore[arg-type]
        print(f"kvscope serve: model {server.model.id} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        try:
            server.run()
        except KeyboardInterrupt:  # Ctrl-C is how a server is stopped
            print("kvscope serve: stopped", file=sys.stderr)
    finally:
        worker.shutdown()
    return 0
