"""`kvscope chat`, `kvscope info`, `kvscope export-trace`."""

from __future__ import annotations

import argparse
import json
import sys

from kvscope.app.common import add_kv_events_args, add_model_arg, kv_events_config, start_engine
from kvscope.engine import Engine, EngineConfig, SamplingParams
from kvscope.engine.events import Event, SessionId, TokenSampled
from kvscope.engine.turns import TurnResult


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("chat", help="chat with a model; prints TTFT, tok/s, cached vs prefilled tokens")
    add_model_arg(p)
    p.add_argument("--prompt", "-p", action="append", help="a user turn (repeat for several); omit for interactive")
    p.add_argument("--system", help="system prompt")
    _add_sampling(p)
    p.add_argument("--trace", help="write a Chrome/Perfetto trace of the chat to this file")
    add_kv_events_args(p)
    p.set_defaults(func=run_chat)

    p = sub.add_parser("info", help="device, dtype, BLAS, model layout")
    add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_info)

    p = sub.add_parser("sessions", help="list (or delete) the sessions the window saved")
    p.add_argument("--data-dir", help="data folder (default: KVSCOPE_HOME or the user data folder)")
    p.add_argument("--delete", metavar="ID", action="append", default=[], help="delete a saved session")
    p.set_defaults(func=run_sessions)

    p = sub.add_parser("export-trace", help="run prompts in one or more sessions and write a Chrome/Perfetto trace")
    p.add_argument("output", help="trace file to write (.json)")
    add_model_arg(p)
    p.add_argument("--prompt", "-p", action="append", required=True, help="a user turn (repeat for several)")
    p.add_argument("--system", help="system prompt (shared by the sessions: shows prefix hits)")
    p.add_argument("--sessions", type=int, default=1, help="run the prompts in this many sessions")
    _add_sampling(p)
    p.set_defaults(func=run_export_trace)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_p, args.seed, args.max_tokens, tuple(args.stop))


def _stream_to_stdout(eng: Engine, sid: SessionId) -> None:
    def on_event(ev: Event) -> None:
        if isinstance(ev, TokenSampled) and ev.session == sid:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

    eng.subscribe(on_event)


def _report(res: TurnResult) -> None:
    st = res.stats
    print(
        f"\n[ttft {st.ttft_ms:.1f} ms | decode {st.decode_tps:.1f} tok/s | "
        f"cached {st.cached_tokens} + prefilled {st.prefilled_tokens} tokens | "
        f"{st.n_generated} generated, {res.finish_reason}]",
        file=sys.stderr,
    )


def run_chat(args: argparse.Namespace) -> int:
    eng = start_engine(args, EngineConfig.from_dict(kv_events_config(args)))
    if args.kv_events:
        pub = eng.kv_publisher
        print(
            f"kvscope: KV events on {getattr(pub, 'endpoint', '')}, replay {getattr(pub, 'replay_endpoint', None)}",
            file=sys.stderr,
        )
    sid = eng.new_session(system=args.system)
    _stream_to_stdout(eng, sid)
    params = sampling_from(args)
    prompts = args.prompt or _interactive()
    for text in prompts:
        _report(eng.chat(sid, text, params))
    if args.trace:
        print(f"trace written to {eng.export_trace(args.trace)}", file=sys.stderr)
    return 0


def _interactive():  # type: ignore[no-untyped-def]
    print("kvscope chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip() or line.strip() in ("/quit", "/exit"):
            return
        yield line


def run_info(args: argparse.Namespace) -> int:
    eng = start_engine(args)
    info = eng.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        ops = info.pop("operations", [])
        info.pop("cache_layout", None)  # the text form is printed; --json has the per-cache list
        for k, v in info.items():
            print(f"{k:>20}: {v}")
        if ops:
            print("\ncache operations on this model (exact / measured / refused):")
            width = max(len(o["op"]) for o in ops)
            for o in ops:
                print(f"  {o['op']:<{width}}  {o['status']:<8}  {o['reason']}".rstrip())
    return 0


def run_export_trace(args: argparse.Namespace) -> int:
    eng = start_engine(args)
    params = sampling_from(args)
    for i in range(max(1, args.sessions)):
        sid = eng.new_session(name=f"chat {i + 1}", system=args.system)
        for text in args.prompt:
            _report(eng.chat(sid, text, params))
    path = eng.export_trace(args.output)
    print(f"trace written to {path} ({len(eng.events)} events); open it in ui.perfetto.dev or chrome://tracing")
    return 0


def run_sessions(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvscope.engine.errors import KVScopeError
    from kvscope.engine.persistence import SessionStore

    store = SessionStore(Path(args.data_dir) if args.data_dir else None)
    failed = 0
    for sid in args.delete:
        try:
            store.delete(sid)  # ids only: never a path, never outside the data folder
        except KVScopeError as exc:
            print(f"kvscope: error: {exc}", file=sys.stderr)
            failed += 1
        else:
            print(f"deleted {sid}")
    store.close()
    rows = store.list()
    if not rows:
        print(f"no saved sessions in {store.root}")
    for r in rows:
        if "error" in r:
            print(f"{r['id']:>6}  unreadable: {r['error']}")
        else:
            print(
                f"{r['id']:>6}  {r['name']!r:30} {r['tokens']:6d} tokens  model {r['model']} ({r['fingerprint'][:8]})"
            )
    return 2 if failed else 0
