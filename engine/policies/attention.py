"""Attention weights on demand: what the last `window` queries looked at.

Only called while deciding, never on a decode step. The recipe:

1. copy the caches and trim the last `window` logical tokens off the copies;
2. feed those tokens again, with each layer's `self_attn.rope` wrapped in a
   recorder: mlx-lm attention rotates the queries right before the keys
   (`queries = self.rope(queries, offset=...)`), so the recorder's first call
   per forward pass is the layer's rotated queries; the model is unchanged;
3. per layer, `softmax(q . K^T * scale)` against the copy's visible keys,
   causal by logical token, query heads grouped onto their KV head (GQA).

    tokens:  0 ............................ T-w ........ T-1
    copy:    [ kept rows of the prefix      ][ re-fed window ]
    queries:                                 q(T-w) ... q(T-1)

The session's caches are never touched. Knows nothing about policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.kv_cache import ScopeKVCache

CHUNK = 256  # queries per forward pass: bounds the [heads, q, k] score tensor


class _RopeRecorder:
    """Stands in for `self_attn.rope`; keeps the first output of each pass (the queries)."""

    def __init__(self, rope: Any) -> None:
        self.rope = rope
        self.queries: mx.array | None = None

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        out = self.rope(x, offset=offset)
        if self.queries is None:
            self.queries = out
        return out


@dataclass
class WindowAttention:
    """Attention mass each logical token received from the window's queries.

    Attributes:
        mass: per layer `[kv_heads, n_tokens]` float32, summed over the
            window's queries and the query heads of each KV head.
        seen_by: `[n_tokens]` number of window queries that could attend to
            each token (causal), to turn sums into means.
        window_start: first logical token of the window.
    """

    mass: list[np.ndarray]
    seen_by: np.ndarray
    window_start: int


def _attention_modules(model: nn.Module) -> list[Any]:
    layers = getattr(model, "layers", None)
    attns = [getattr(layer, "self_attn", None) for layer in layers] if layers else []
    if not attns or any(a is None or getattr(a, "rope", None) is None for a in attns):
        raise UnsupportedModelError(
            "attention-based policies need mlx-lm attention layers with a `self_attn.rope` module; "
            "use key_norm, streaming_llm or random for this model"
        )
    return attns


def window_attention(
    model: nn.Module, caches: list[ScopeKVCache], token_ids: list[int], window: int | None
) -> WindowAttention:
    """Recompute the last `window` tokens' queries (None = all) and their attention.

    Args:
        model: an mlx-lm model whose layers use `caches`.
        caches: per-layer caches; only copies of them are fed.
        token_ids: logical token ids, at least up to `caches[0].n_tokens`.
        window: number of most recent tokens whose queries are observed.
    """
    attns = _attention_modules(model)
    n_tokens = caches[0].n_tokens
    w = n_tokens if window is None else min(int(window), n_tokens)
    start = n_tokens - w
    copies = [c.copy() for c in caches]
    for c in copies:
        c.trim(w)
    originals = [a.rope for a in attns]
    recorders = [_RopeRecorder(r) for r in originals]
    mass = [np.zeros((0, n_tokens), np.float32) for _ in caches]
    try:
        for a, rec in zip(attns, recorders):
            a.rope = rec
        for lo in range(start, n_tokens, CHUNK):
            hi = min(lo + CHUNK, n_tokens)
            for rec in recorders:
                rec.queries = None
            model(mx.array(token_ids[lo:hi])[None], cache=copies)
            q_tokens = np.arange(lo, hi)
            for i, (a, rec, c) in enumerate(zip(attns, recorders, copies)):
                assert rec.queries is not None
                part = _layer_mass(rec.queries, c, q_tokens, float(getattr(a, "scale", 0.0)), n_tokens)
                mass[i] = part if mass[i].shape[0] == 0 else mass[i] + part
    finally:
        for a, r in zip(attns, originals):
            a.rope = r
    seen_by = np.clip(n_tokens - np.maximum(np.arange(n_tokens), start), 0, None).astype(np.float32)
    return WindowAttention(mass, seen_by, start)


def _layer_mass(
    queries: mx.array, cache: ScopeKVCache, q_tokens: np.ndarray, scale: float, n_tokens: int
) -> np.ndarray:
    """`[kv_heads, n_tokens]` attention mass from `queries` onto the cache's visible keys
    (head-wise caches: each head onto the rows it holds)."""
    keys, _, k_tokens, presence = cache.visible_rows()
    keys = keys[0]  # [Hkv, N, D]: the attended rows, one per token
    q = queries[0]  # [Hq, L, D]
    n_kv, head_dim = keys.shape[0], keys.shape[-1]
    group = q.shape[0] // n_kv
    scale = scale or head_dim**-0.5
    q = q.reshape(n_kv, group * q.shape[1], head_dim).astype(mx.float32)
    logits = (q @ keys.astype(mx.float32).transpose(0, 2, 1)) * scale  # [Hkv, G*L, N]
    causal = np.tile(k_tokens[None, :] <= q_tokens[:, None], (group, 1))
    allowed = mx.array(causal[None] & presence[:, None, :])  # [Hkv, G*L, N]
    logits = mx.where(allowed, logits, mx.array(-np.inf, mx.float32))
    probs = mx.softmax(logits, axis=-1).sum(axis=1)  # [Hkv, N]
    out = np.zeros((n_kv, n_tokens), np.float32)
    out[:, k_tokens] = np.array(probs)
    return out
