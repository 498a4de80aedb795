"""`kvscope segment save|load|inspect`: segment files from the command line.

`save` prefills a message and writes a span of it as a segment file; `load`
splices a segment file (or an mlx-lm prompt cache, with `--prompt`) into a new
chat and can ask a question; `inspect` verifies a file (size, checksum,
manifest) and prints its manifest. The headless twin of the window's "Save as
a segment file…" and of dropping a file onto a session.
"""

from __future__ import annotations

import argparse
import json

from kvscope.app.common import add_model_arg, ask, chat_with_system, print_report, start_engine, token_span
from kvscope.engine.segment_file import inspect_segment
from kvscope.engine.splicing import SpliceOptions


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    seg = sub.add_parser("segment", help="segment files: save, load, inspect")
    ss = seg.add_subparsers(dest="segment_command", required=True, metavar="ACTION")
    sv = ss.add_parser("save", help="prefill text and save a span of it as a segment file")
    add_model_arg(sv)
    sv.add_argument("--text", required=True, help="the text (a user message)")
    sv.add_argument("--span", type=token_span, help="LO:HI token span (default: the whole message)")
    sv.add_argument("-o", "--output", required=True)
    sv.set_defaults(func=run_segment_save)
    ins = ss.add_parser("inspect", help="verify a segment file and print its manifest")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=run_segment_inspect)
    ld = ss.add_parser("load", help="splice a segment (or an mlx-lm prompt cache) into a new chat")
    add_model_arg(ld)
    ld.add_argument("file")
    ld.add_argument("--system", help="system prompt of the new chat")
    ld.add_argument("--text", help="a user message before the segment")
    ld.add_argument("--at", type=int, help="token index to insert at (default: the end)")
    ld.add_argument("--seam-repair", type=int, default=0)
    ld.add_argument("--prompt", help="for mlx-lm prompt-cache files: the prompt they were made from")
    ld.add_argument("--ask", help="then ask this question")
    ld.set_defaults(func=run_segment_load)


def run_segment_save(args: argparse.Namespace) -> int:
    eng = start_engine(args)
    sid = eng.new_session()
    n = eng.append_message(sid, "user", args.text)
    lo, hi = args.span or (0, n)
    path = eng.save_segment(sid, lo, hi, args.output)
    print(f"wrote {path}: tokens [{lo}, {hi}) of {n}")
    return 0


def run_segment_inspect(args: argparse.Namespace) -> int:
    man = inspect_segment(args.file)
    if args.json:
        print(json.dumps(man, indent=2))
        return 0
    n = len(man["token_ids"])
    covers = "tensors and manifest" if man["version"] >= 2 else "tensors only: a version 1 file"
    print(f"{args.file}: kvscope segment v{man['version']}, {n} tokens, checksum OK ({covers})")
    for key in ("model_name", "model_fingerprint", "n_layers", "n_kv_heads", "head_dim", "dtype", "rope"):
        print(f"  {key:>17}: {man[key]}")
    print(f"  {'positions':>17}: {man['positions'][0]}..{man['positions'][-1]}")
    print(f"  {'text':>17}: {man['text'][:200]!r}")
    return 0


def run_segment_load(args: argparse.Namespace) -> int:
    eng = start_engine(args)
    sid = chat_with_system(eng, args.system)
    if args.text:
        eng.append_message(sid, "user", args.text)
    print_report(
        "splice", eng.splice_file(sid, args.file, SpliceOptions(at=args.at, seam_repair=args.seam_repair), args.prompt)
    )
    ask(eng, sid, args.ask)
    return 0
