"""Decode speed and bytes on a head-wise compressed cache, side by side with the full cache.

One ~2k-token context (the demo model's notes format) is prefilled once;
copies are compressed with each configuration: per-layer `snapkv`,
`per_head` and `adakv` (as published, and with `cap=1.5`) over SnapKV, and
the side-by-side's headline presses (`per_head(keydiff)`, `kvzip`), at 50%
and 25% of the rows. Then decode steps (one token on the cache, greedy
token fed back, `mx.eval` each step) run interleaved: every round times a
burst of steps on every configuration in a shuffled order, so a load spike
on the shared machine hits all of them alike. Reported: median ms per step,
the median of per-round ratios full / configuration (>= 1.0: at least as
fast as the full cache), the bytes each cache holds right after compression (head-wise layers hold
max-over-heads columns: padding counted) and the (head, token) rows kept.

Target: every compressed cache decodes at least as fast as the full one,
and frees real bytes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from _common import model_arg, resolve_model  # first: it preloads BLAS before mlx
from kvscope.engine import chat, load_model
from kvscope.engine.caches.layout import make_session_caches
from kvscope.engine.compression import compress_caches
from kvscope.engine.generation import forward, prefill

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
    # the side-by-side's headline presses (docs/compression.md): kvpress's KeyDiff and KVzip twins
    ("per_head", 0.5, {"scorer": "keydiff"}),
    ("kvzip", 0.5, {}),
    ("per_head", 0.25, {"scorer": "keydiff"}),
    ("kvzip", 0.25, {}),
)


def label(policy: str, ratio: float | None, kw: dict) -> str:
    cap = f" cap {kw['cap']}" if "cap" in kw else ""
    scorer = f"({kw['scorer']})" if kw.get("scorer", "snapkv") != "snapkv" else ""
    return "full cache" if ratio is None else f"{policy}{scorer}{cap} {ratio:.0%}"


def notes(n_lines: int) -> str:
    return "Notes:\n" + "\n".join(f"The code for locker {i} is {(i * 7919) % 9000 + 1000}." for i in range(n_lines))


def context_ids(lm, n_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    lines = 8
    while True:
        ids = chat.encode(lm.tokenizer, notes(lines))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        lines = int(lines * n_tokens / max(len(ids), 1)) + 2


def main() -> None:
    import mlx.core as mx
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(p)
    p.add_argument("--context", type=int, default=2048, help="context tokens")
    p.add_argument("--steps", type=int, default=8, help="decode steps per configuration and round")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    lm = load_model(resolve_model(args.model))
    ids = context_ids(lm, args.context)
    base = make_session_caches(lm.model)
    prefill(lm.model, base, ids, 256)
    caches, kept, held = {}, {}, {}
    for policy, ratio, kw in CONFIGS:
        name = label(policy, ratio, kw)
        copies = [c.copy() for c in base]
        rows = len(ids) * lm.n_kv_heads * lm.n_layers
        if ratio is not None:
            d = compress_caches(copies, ids, lm.model, policy, keep_ratio=ratio, tokenizer=lm.tokenizer, **kw)
            budgets = d.head_budgets
            rows = sum(sum(b) for b in budgets) if budgets else sum(d.kept_counts) * lm.n_kv_heads
        caches[name], kept[name], held[name] = copies, rows, sum(c.nbytes for c in copies)
    ms: dict[str, list[float]] = {name: [] for name in caches}
    token = {name: int(ids[-1]) for name in caches}
    rng = random.Random(0)
    for rnd in range(args.rounds + 1):
        order = list(caches)
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                logits = forward(lm.model, [token[name]], caches[name])
                mx.eval(logits)
                token[name] = int(np.argmax(np.array(logits[0, -1])))
            if rnd:  # round 0 warms up
                ms[name].append((time.perf_counter() - t0) * 1000 / args.steps)
    full = ms["full cache"]
    before = held["full cache"]
    print(
        f"model: {lm.name} ({lm.n_layers} layers, {lm.n_kv_heads} KV heads, {lm.dtype}); context {len(ids)} tokens; "
        f"{args.steps} decode steps x {args.rounds} rounds per configuration, interleaved"
    )
    print(f"{'configuration':<24} {'ms/step':>8} {'full ÷ this':>11} {'bytes held':>12} {'freed':>7} {'rows kept':>10}")
    for name in caches:
        ratio = statistics.median(f / m for f, m in zip(full, ms[name]))
        rows = kept[name] / (len(ids) * lm.n_kv_heads * lm.n_layers)
        print(
            f"{name:<24} {statistics.median(ms[name]):8.2f} {ratio:11.2f} {held[name]:12,d} "
            f"{1 - held[name] / before:7.1%} {rows:10.1%}"
        )
    print("full ÷ this: median of per-round ratios of ms/step (>= 1.0: at least as fast as the full cache);")
    print("rows kept: the (head, token) rows the decision keeps, as a share of the full cache (padding excluded)")


if __name__ == "__main__":
    main()
