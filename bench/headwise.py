"""Decode tok/s and bytes on a head-wise compressed cache, side by side with the full cache.

Each round copies one ~2k-token session once per configuration (full cache;
`adakv` (as published, and with `cap=1.5`) and `per_head` over SnapKV at
50% and 25% of the rows; per-layer `snapkv` at the same ratios for reference), compresses the copy, then asks
the same question and decodes the same number of tokens greedily (eos
disabled). Ratios are medians of per-round ratios to the full cache, so
every pair ran under the same load. Bytes: what the cache holds before and
after (head-wise layers hold max-over-heads columns: the padding of heads
with smaller budgets is counted), and the rows the heads actually keep.

Target: decode on the compressed cache at least as fast as on the full one
(ratio >= 1.0) and real bytes freed.
"""

from __future__ import annotations

import argparse
import random

from _common import med, model_arg, resolve_model
from kvscope.engine import Engine, EngineConfig, SamplingParams

CONFIGS: tuple[tuple[str, float | None, dict], ...] = (
    ("full", None, {}),
    ("snapkv", 0.5, {}),
    ("per_head", 0.5, {"scorer": "snapkv"}),
    ("adakv", 0.5, {"scorer": "snapkv"}),
    ("adakv", 0.5, {"scorer": "snapkv", "cap": 1.5}),
    ("snapkv", 0.25, {}),
    ("per_head", 0.25, {"scorer": "snapkv"}),
    ("adakv", 0.25, {"scorer": "snapkv"}),
    ("adakv", 0.25, {"scorer": "snapkv", "cap": 1.5}),
)


def notes(n_lines: int) -> str:
    return "Notes:\n" + "\n".join(f"The code for locker {i} is {(i * 7919) % 9000 + 1000}." for i in range(n_lines))


def label(policy: str, ratio: float | None, kw: dict) -> str:
    cap = f" cap {kw['cap']}" if "cap" in kw else ""
    return "full cache" if ratio is None else f"{policy}{cap} {ratio:.0%}"


def build_base(eng: Engine, context: int) -> str:
    base = eng.new_session("base")
    lines = 8
    while eng.session(base).n_tokens < context:  # grow the document until it fills the context
        eng.close_session(base)
        base = eng.new_session("base")
        eng.append_message(base, "user", notes(lines))
        lines = int(lines * context / max(eng.session(base).n_tokens, 1)) + 1
    return base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(p)
    p.add_argument("--context", type=int, default=2048, help="context tokens (about)")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    eng = Engine(EngineConfig(persist=False))
    lm = eng.load(resolve_model(args.model))
    lm.tokenizer.eos_token_ids = set()  # a fixed token count everywhere
    base = build_base(eng, args.context)
    n = eng.session(base).n_tokens
    tps: dict[str, list[float]] = {label(p, r, kw): [] for p, r, kw in CONFIGS}
    size: dict[str, tuple[int, int, int]] = {}
    params = SamplingParams(max_tokens=args.tokens)
    rng = random.Random(0)
    for rnd in range(args.rounds + 1):
        order = list(CONFIGS)
        rng.shuffle(order)  # no configuration always runs first or last in a round
        for policy, ratio, kw in order:
            name = label(policy, ratio, kw)
            sid = eng.duplicate_session(base, name)
            before = eng.session(sid).nbytes
            kept = before
            if ratio is not None:
                d = eng.compress(sid, policy, keep_ratio=ratio, **kw)
                per_head_row = before // max(n * lm.n_layers * lm.n_kv_heads, 1)
                rows = sum(sum(b) for b in d.head_budgets) if d.head_budgets else sum(d.kept_counts) * lm.n_kv_heads
                kept = rows * per_head_row
            size[name] = (before, eng.session(sid).nbytes, kept)
            res = eng.chat(sid, "What is the code for locker 3?", params)
            assert res.stats.n_generated == args.tokens
            if rnd:  # round 0 warms up
                tps[name].append(res.stats.decode_tps)
            eng.close_session(sid)
    print(
        f"model: {lm.name} ({lm.n_layers} layers, {lm.n_kv_heads} KV heads, {lm.dtype}); context {n} tokens; "
        f"{args.tokens} tokens x {args.rounds} rounds"
    )
    full = tps["full cache"]
    print(f"{'configuration':<20} {'tok/s':>8} {'÷ full':>7} {'bytes held':>12} {'freed':>7} {'rows kept':>10}")
    for policy, ratio, kw in CONFIGS:
        name = label(policy, ratio, kw)
        ratio_tps = med([a / b for a, b in zip(tps[name], full)])
        before, after, kept = size[name]
        print(
            f"{name:<20} {med(tps[name]):8.1f} {ratio_tps:7.2f} {after:12,d} {1 - after / before:7.1%} "
            f"{kept / before:10.1%}"
        )
    print("÷ full: median of per-round ratios (target >= 1.0); freed: share of the full cache's bytes released;")
    print("rows kept: the (head, token) rows the decision keeps, as a share of the full cache (padding excluded)")


if __name__ == "__main__":
    main()
