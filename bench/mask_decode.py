"""Decode tok/s with part of the context masked / with nothing masked, interleaved in one run.

Masking is the project's central move ("prefixes are not rewritten, they are
masked"), so it must make decoding cheaper, not dearer: masked rows leave the
attended buffer. Each round copies one ~4k-token session three times, masks
0%, 10% and 50% of its context (a span in the middle), and decodes the same
number of tokens greedily on each (eos disabled). Targets: >= 1.0 at 10%,
>= 1.3 at 50%, as the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import random

from _common import med, model_arg, resolve_model
from kvscope.engine import Engine, EngineConfig, SamplingParams


def notes(n_lines: int) -> str:
    return "Notes:\n" + "\n".join(f"The code for locker {i} is {(i * 7919) % 9000 + 1000}." for i in range(n_lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(p)
    p.add_argument("--context", type=int, default=4096, help="context tokens (about)")
    p.add_argument("--tokens", type=int, default=96, help="tokens decoded per measurement")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    eng = Engine(EngineConfig(persist=False))
    lm = eng.load(resolve_model(args.model))
    lm.tokenizer.eos_token_ids = set()  # a fixed token count everywhere
    base = eng.new_session("base")
    lines = 8
    while eng.session(base).n_tokens < args.context:  # grow the document until it fills the context
        eng.close_session(base)
        base = eng.new_session("base")
        eng.append_message(base, "user", notes(lines))
        lines = int(lines * args.context / max(eng.session(base).n_tokens, 1)) + 1
    n = eng.session(base).n_tokens
    fractions = (0.0, 0.1, 0.5)
    tps: dict[float, list[float]] = {f: [] for f in fractions}
    params = SamplingParams(max_tokens=args.tokens)
    rng = random.Random(0)
    for r in range(args.rounds + 1):
        order = list(fractions)
        rng.shuffle(order)  # no configuration always runs first or last in a round
        for f in order:
            sid = eng.duplicate_session(base, f"masked {f:.0%}")
            k = int(n * f)
            if k:
                lo = (n - k) // 2
                eng.mask(sid, lo, lo + k, fidelity=False)
            res = eng.chat(sid, "What is the code for locker 3?", params)
            assert res.stats.n_generated == args.tokens
            if r:  # round 0 warms up
                tps[f].append(res.stats.decode_tps)
            eng.close_session(sid)
    print(
        f"model: {lm.name} ({lm.n_layers} layers, {lm.dtype}); context {n} tokens; {args.tokens} tokens x {args.rounds} rounds"
    )
    for f in fractions:
        print(f"masked {f:4.0%}: {med(tps[f]):8.1f} tok/s (median)")
    for f, target in ((0.1, 1.0), (0.5, 1.3)):
        ratio = med([m / u for m, u in zip(tps[f], tps[0.0])])  # per round: both under the same load
        print(f"ratio masked {f:.0%} / unmasked = {ratio:.2f} (median of per-round ratios; target >= {target})")


if __name__ == "__main__":
    main()
