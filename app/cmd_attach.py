"""`kvscope attach`: follow serving engines' prefix caches through vLLM's KV events, headless.

    kvscope attach tcp://127.0.0.1:5557 --replay tcp://127.0.0.1:5558
    kvscope attach --bind tcp://127.0.0.1:5557 ...   (vLLM connects to a non-wildcard endpoint)

Prints one summary line per engine whenever it changes, and at the end
(--duration, --until-blocks or Ctrl-C) the blocks as JSON (--json) and the
cached prefix each engine holds for --prompt. --window shows the engines in
a window instead (kvscope.ui.attach_window; each stream is then decoded in
a process of its own, kvscope.attach.process_client). Wiring only: the work is in
kvscope.attach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "attach",
        help="follow a serving engine's KV cache (vLLM KV events over ZMQ)",
        description="Subscribe to vLLM-format KV events (vLLM, SGLang, kvscope --kv-events) and "
        "rebuild each engine's prefix cache: blocks, parents, tokens, evictions.",
    )
    p.add_argument("endpoints", nargs="+", metavar="ENDPOINT", help="ZMQ PUB endpoint(s), e.g. tcp://127.0.0.1:5557")
    p.add_argument("--replay", nargs="+", default=[], metavar="ENDPOINT", help="replay (ROUTER) endpoint per ENDPOINT")
    p.add_argument(
        "--metrics", nargs="+", default=[], metavar="URL", help="vLLM /metrics URL per ENDPOINT: hit rate, usage"
    )
    p.add_argument("--topic", default="", help="topic prefix to subscribe to (default: all)")
    p.add_argument("--bind", action="store_true", help="bind the endpoints (the publisher connects), as vLLM expects")
    p.add_argument("--tokenizer", metavar="MODEL", help="model folder whose tokenizer turns token ids into text")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="report each engine's cached prefix for this user message (or JSON list of messages), chat template applied",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between summary lines (default 1)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    p.add_argument("--until-blocks", type=int, metavar="N", help="stop once every engine holds >= N blocks")
    p.add_argument("--record", metavar="FILE", help="also write every message received, raw, to FILE (JSON lines)")
    p.add_argument("--window", action="store_true", help="show the engines in a window (read-only views)")
    p.add_argument("--json", metavar="FILE", help="write the engines' blocks as JSON at the end ('-': stdout)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvscope.attach import AttachClient
    from kvscope.attach.fleet import common_content, prefix_hits, prompt_tokens
    from kvscope.attach.metrics import MetricsPoller
    from kvscope.attach.process_client import AttachProcess
    from kvscope.attach.recording import Recorder

    if len(args.replay) > len(args.endpoints) or len(args.metrics) > len(args.endpoints):
        print("kvscope attach: more --replay endpoints or --metrics URLs than ENDPOINTs", file=sys.stderr)
        return 2
    if args.prompt and not args.tokenizer:
        print("kvscope attach: --prompt needs --tokenizer to turn the text into token ids", file=sys.stderr)
        return 2
    tok = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    try:
        recorder = Recorder(args.record) if args.record else None  # the attach processes append to it
    except OSError as exc:
        print(f"kvscope attach: cannot write {args.record}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    clients: list[Any] = []
    try:
        for i, ep in enumerate(args.endpoints):
            replay = args.replay[i] if i < len(args.replay) else None
            if args.window:  # each stream decoded in a process of its own: the window never waits for one
                client: Any = AttachProcess(ep, replay, args.topic, bind=args.bind, record_path=args.record)
            else:
                client = AttachClient(ep, replay, args.topic, bind=args.bind, record=recorder)
            clients.append(client)
            if i < len(args.metrics):
                client.metrics = MetricsPoller(args.metrics[i])
        if args.window:
            _window(clients, args)
        else:
            _follow(clients, args)
    except ValueError as exc:
        print(f"kvscope attach: {exc}", file=sys.stderr)
        _close(clients, recorder)
        return 2
    except KeyboardInterrupt:
        pass
    try:  # the engines are read before they close (an attach process keeps nothing after)
        out = sys.stderr if args.json == "-" else sys.stdout
        if len(clients) > 1:
            print(f"blocks held by all {len(clients)} engines: {len(common_content(clients))}", file=out)
        for text in args.prompt:
            ids = prompt_tokens(tok, text) if tok is not None else []
            hits = ", ".join(f"{name}: {n} tokens" for name, n in prefix_hits(clients, ids))
            print(f"cached prefix of {len(ids)}-token prompt {text[:40]!r}: {hits}", file=out)
        if args.json:
            _write_json(clients, args.json, (lambda ids: tok.decode(ids)) if tok is not None else None)
    finally:
        _close(clients, recorder)
    return 1 if any(c.error for c in clients) else 0


def _close(clients: list[Any], recorder: Any) -> None:
    for c in clients:
        c.close()
    if recorder is not None:
        recorder.close()


def _follow(clients: list[Any], args: argparse.Namespace) -> None:
    out = sys.stderr if args.json == "-" else sys.stdout
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    last: dict[str, str] = {}
    next_print = 0.0
    while True:
        now = time.monotonic()
        if now >= next_print:
            for c in clients:
                line = c.summary()
                if last.get(c.name) != line:
                    print(line, file=out, flush=True)
                    last[c.name] = line
            next_print = now + args.interval
        if deadline is not None and now >= deadline:
            return
        if args.until_blocks is not None and all(
            c.read(lambda cache, _s: len(cache)) >= args.until_blocks for c in clients
        ):
            for c in clients:
                print(c.summary(), file=out, flush=True)
            return
        if any(c.error for c in clients):
            return
        time.sleep(0.05)


def _window(clients: list[Any], args: argparse.Namespace) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from kvscope.ui.attach_view import load_tokenizer_async
    from kvscope.ui.attach_window import AttachWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    from kvscope.attach.gc_pauses import freeze_startup_heap

    win = AttachWindow(clients, load_tokenizer_async(args.tokenizer), close_clients=False)  # read after it closes
    win.show()
    freeze_startup_heap()  # full collections walk only what is made from now on (attach/gc_pauses.py)
    if args.duration > 0:
        QTimer.singleShot(int(args.duration * 1000), win.close)
    app.exec()


def _write_json(clients: list[Any], path: str, decode: Callable[[list[int]], str] | None) -> None:
    doc = {
        "engines": [
            {
                "name": c.name,
                "endpoint": c.endpoint,
                "replay_endpoint": c.replay_endpoint,
                "error": c.error,
                "metrics": _metrics_json(c.metrics),
                **_with_text(c.read(engine_json), decode),
            }
            for c in clients
        ]
    }
    text = json.dumps(doc, indent=1)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def engine_json(cache: Any, stats: Any) -> dict[str, Any]:
    """One engine's stream counters and blocks (module level: it is sent to attach processes)."""
    return {"stream": stats.as_dict(), **cache.to_json()}


def _with_text(doc: dict[str, Any], decode: Callable[[list[int]], str] | None) -> dict[str, Any]:
    """The blocks' and hot blocks' token ids as text, decoded here (the tokenizer stays in this process)."""
    if decode is None:
        return doc
    tokens = {}
    for b in doc["blocks"]:
        if b["token_ids"]:
            b["text"] = decode(b["token_ids"])
            tokens[b["hash"]] = b["text"]
    for h in doc["hot"]:
        if h["hash"] in tokens:
            h["text"] = tokens[h["hash"]]
    return doc


def _metrics_json(poller: Any) -> dict[str, Any] | None:
    if poller is None:
        return None
    samples = poller.samples()
    last = samples[-1] if samples else None
    return {
        "url": poller.url,
        "error": poller.error,
        "queries": last.queries if last else None,
        "hits": last.hits if last else None,
        "kv_cache_usage": last.usage if last else None,
        "hit_rate_10s": poller.hit_rate(),
    }


def _load_tokenizer(name: str) -> Any:
    from pathlib import Path

    from kvscope.engine.errors import ModelLoadError

    path = Path(name)
    if not path.is_dir():
        raise ModelLoadError(f"--tokenizer {name!r}: not a model folder (give the folder the engine serves)")
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path)
