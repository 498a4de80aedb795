"""Decode tok/s of the kvscope engine / plain mlx-lm `stream_generate`, interleaved in one run.

Target: >= 0.95. Both generate exactly --tokens tokens (eos disabled for both).
"""

from __future__ import annotations

import argparse

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from _common import med, model_arg, resolve_model
from kvscope.engine import Engine, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_arg(p)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    eng = Engine()
    lm = eng.load(resolve_model(args.model))
    lm.tokenizer.eos_token_ids = set()  # fixed token count on both sides
    prompt = "Tell me about the lockers in the building and their codes."
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ours, theirs = [], []
    for r in range(args.rounds + 1):
        res = eng.chat(eng.new_session(), prompt, SamplingParams(max_tokens=args.tokens))
        last = None
        for step in stream_generate(
            lm.model, lm.tokenizer, mx.array(ids), max_tokens=args.tokens, sampler=make_sampler(0.0)
        ):
            last = step
        if r == 0:
            continue  # warm-up
        assert last is not None and res.stats.n_generated == last.generation_tokens == args.tokens
        ours.append(res.stats.decode_tps)
        theirs.append(last.generation_tps)
        for sid in eng.sessions():
            eng.close_session(sid)
    print(f"model: {lm.name} ({lm.n_layers} layers, {lm.dtype}); {args.tokens} tokens x {args.rounds} rounds")
    print(f"kvscope decode : {med(ours):8.1f} tok/s (median)")
    print(f"mlx-lm decode  : {med(theirs):8.1f} tok/s (median)")
    print(f"ratio kvscope / mlx-lm = {med(ours) / med(theirs):.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
