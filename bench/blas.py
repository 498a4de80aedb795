"""Prefill speed with the optimized BLAS / with MLX's bundled reference BLAS.

The BLAS is chosen when the process starts, so each measurement runs in a
child process (KVSCOPE_BLAS=off for the reference); rounds alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import med, model_arg, resolve_model

CHILD = r"""
import json, sys, time
import kvscope.engine
from kvscope.engine import blas
from kvscope.engine.model_loading import load_model
from kvscope.engine.generation import prefill
from kvscope.engine.kv_cache import ScopeKVCache
import mlx.core as mx
lm = load_model(sys.argv[1]); n = int(sys.argv[2])
ids = [i % 200 + 10 for i in range(n)]
def run():
    c = [ScopeKVCache() for _ in range(lm.n_layers)]
    t = time.perf_counter(); prefill(lm.model, c, ids, 512); mx.eval([x.keys for x in c]); return time.perf_counter() - t
run()
t = min(run() for _ in range(2))
print(json.dumps({"blas": blas.info().name, "tok_s": n / t}))
"""


def measure(model: str, n: int, blas: str) -> dict[str, object]:
    env = dict(os.environ, KVSCOPE_BLAS=blas)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(n)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_arg(p)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    model = resolve_model(args.model)
    fast, ref, name = [], [], "?"
    for _ in range(args.rounds):
        a = measure(model, args.tokens, "auto")
        b = measure(model, args.tokens, "off")
        name = str(a["blas"])
        fast.append(float(a["tok_s"]))  # type: ignore[arg-type]
        ref.append(float(b["tok_s"]))  # type: ignore[arg-type]
    print(f"model: {model}; prefill of {args.tokens} tokens, float32")
    print(f"{name:>10}: {med(fast):8.1f} tok/s")
    print(f"{'reference':>10}: {med(ref):8.1f} tok/s")
    print(f"ratio optimized / reference = {med(fast) / med(ref):.2f}x")


if __name__ == "__main__":
    main()
