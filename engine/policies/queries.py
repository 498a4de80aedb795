"""Queries on demand, for presses that score with more than one attention window.

- `context_queries`: every logical token's *pre-RoPE* queries per layer
  (kvpress's `get_prerope_query_states` over the prefill's hidden states),
  by re-feeding the caches' tokens on emptied copies with each layer's
  `self_attn.rope` wrapped: mlx-lm attention calls `self.rope(queries, ...)`
  first, so the wrapper's first input per pass is the layer's queries.
- `feed_recording`: feed extra tokens on copies of the caches and return the
  *rotated* queries per layer plus the copies (which then hold those tokens'
  keys too): KVzip's context-reconstruction pass.
- `mean_rotation`: the RoPE rotation averaged over a range of positions, as
  a `[head_dim, head_dim]` matrix `R` with `mean_p rope_p(x) = R @ x`, built
  with the layer's own rope module (so any frequency layout or scaling the
  model uses is the one averaged).

The session's caches are never touched. Knows nothing about policies.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.policies.attention import _attention_modules

CHUNK = 512  # tokens per forward pass when re-feeding a context


class _Recorder:
    """Stands in for `self_attn.rope`; keeps the first call's input and output of each pass."""

    def __init__(self, rope: Any) -> None:
        self.rope = rope
        self.inputs: mx.array | None = None
        self.outputs: mx.array | None = None

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        out = self.rope(x, offset=offset)
        if self.inputs is None:
            self.inputs, self.outputs = x, out
        return out


def _feed(model: nn.Module, copies: list[ScopeKVCache], ids: list[int], rotated: bool) -> list[mx.array]:
    """Feed `ids` in chunks on `copies`; per layer the recorded queries `[Hq, len(ids), D]`."""
    attns = _attention_modules(model)
    originals = [a.rope for a in attns]
    recorders = [_Recorder(r) for r in originals]
    parts: list[list[mx.array]] = [[] for _ in attns]
    try:
        for a, rec in zip(attns, recorders):
            a.rope = rec
        for lo in range(0, len(ids), CHUNK):
            for rec in recorders:
                rec.inputs = rec.outputs = None
            model(mx.array(ids[lo : lo + CHUNK])[None], cache=copies)
            for i, rec in enumerate(recorders):
                q = rec.outputs if rotated else rec.inputs
                assert q is not None
                parts[i].append(q[0].astype(mx.float32))
            mx.eval([p[-1] for p in parts])
    finally:
        for a, r in zip(attns, originals):
            a.rope = r
    return [mx.concatenate(p, axis=1) if len(p) > 1 else p[0] for p in parts]


def context_queries(model: nn.Module, caches: list[ScopeKVCache], token_ids: list[int]) -> list[mx.array]:
    """Per layer, the pre-RoPE queries `[Hq, n_tokens, D]` of the caches' logical tokens."""
    n = caches[0].n_tokens
    copies = [c.copy() for c in caches]
    for c in copies:
        c.trim(c.n_tokens)
    return _feed(model, copies, list(token_ids[:n]), rotated=False)


def feed_recording(
    model: nn.Module, caches: list[ScopeKVCache], ids: list[int]
) -> tuple[list[mx.array], list[ScopeKVCache]]:
    """Feed `ids` after the caches' tokens (on copies): rotated queries per layer, and the copies."""
    copies = [c.copy() for c in caches]
    return _feed(model, copies, list(ids), rotated=True), copies


def mean_rotation(rope: Any, head_dim: int, start: int, n: int) -> mx.array:
    """`R` `[D, D]` with `R @ x == mean over p in [start, start+n) of rope(x at position p)`."""
    basis = mx.broadcast_to(mx.eye(head_dim, dtype=mx.float32)[None, :, None, :], (1, head_dim, n, head_dim))
    out = rope(basis, offset=start)  # out[0, i, p] = R_p @ e_i, column i of R_p
    return out[0].mean(axis=1).T
