"""TTFT with a prefix-store hit / full recompute, for shared prefixes of 512, 2048 (and 8192) tokens.

Each round: session A prefills `system + question A` (storing the prefix
blocks); session B asks another 32-token question on the same system prompt
(prefix hit); session C does the same on an engine whose store was cleared
(full recompute). Rounds interleave B and C.
"""

from __future__ import annotations

import argparse

from _common import med, model_arg, resolve_model
from kvscope.engine import Engine, SamplingParams

WORDS = "the locker code report lists rooms colours names numbers and the notes of the day".split()


def text_of_tokens(eng: Engine, n: int) -> str:
    tok = eng.model.tokenizer
    words: list[str] = []
    while len(tok.encode(" ".join(words), add_special_tokens=False)) < n:
        words += WORDS
    while len(tok.encode(" ".join(words), add_special_tokens=False)) > n:
        words.pop()
    return " ".join(words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_arg(p)
    p.add_argument("--prefix", default="512,2048", help="comma-separated prefix lengths (tokens)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    eng, cold = Engine(), Engine()
    path = resolve_model(args.model)
    eng.load(path)
    cold.load(path)
    one = SamplingParams(max_tokens=1)
    print(f"model: {eng.model.name}; suffix 32 tokens; TTFT median of {args.rounds} rounds")
    print(f"{'prefix':>7} {'hit ms':>9} {'full ms':>9} {'hit/full':>9} {'speed-up':>9} cached")
    for n in [int(x) for x in args.prefix.split(",")]:
        system = text_of_tokens(eng, n)
        question = text_of_tokens(eng, 32)
        hit, full, cached = [], [], 0
        eng.chat(eng.new_session(system=system), "What is the first code?", one)
        cold.chat(cold.new_session(system=system), "warm up", one)
        for _ in range(args.rounds):
            r = eng.chat(eng.new_session(system=system), question, one)
            hit.append(r.stats.ttft_ms)
            cached = r.stats.cached_tokens
            assert cold.store is not None
            cold.store.clear()
            full.append(cold.chat(cold.new_session(system=system), question, one).stats.ttft_ms)
        h, f = med(hit), med(full)
        print(f"{n:>7} {h:9.1f} {f:9.1f} {h / f:9.3f} {f / h:8.1f}x {cached}")


if __name__ == "__main__":
    main()
