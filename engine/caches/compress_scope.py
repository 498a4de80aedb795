"""Which caches a compression policy may evict from, on any cache layout.

A plain model compresses every layer. On other layouts compression runs on
the caches where evicting a row is the same as masking it for good and
nothing else reads it differently:

    cache kind                    compressed?   why
    full attention (incl. MLA,    yes           rows are per token; the rest of the model reads
    shared-KV sources)                          exactly the rows the cache returns
    sliding window                no            every sliding layer must attend the same rows (one
                                                window mask for all); they read at most `window` rows
    recurrent state               no            no rows: the state has absorbed every token
    chunked / other               no            mlx-lm's own cache, rows not kvscope's

Policies that recompute attention (snapkv, h2o, tova, pyramidkv, dynamickv)
run the whole model over copies of every cache: they stay on plain
layouts; on the others the row-scoring policies (key_norm, keydiff,
streaming_llm, random, quantize) run. The decision still has one layer per
cache: the caches left alone keep every row and say so (`budget` = their
rows, nothing evicted), so the window and replays read it like any other.

Knows nothing about sessions or events.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.nn as nn
import numpy as np

from kvscope.engine.caches.sliding import SlidingScopeKVCache
from kvscope.engine.errors import InvalidRequestError, UnsupportedModelError
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.policies.base import Policy
from kvscope.engine.policies.decision import Decision, LayerDecision


def compressible(cache: Any) -> bool:
    """A full-attention row cache (MLA and shared-KV sources included), not a sliding one."""
    return isinstance(cache, ScopeKVCache) and not isinstance(cache, SlidingScopeKVCache)


def targets(caches: list[Any]) -> list[int]:
    """Indices of the caches a policy evicts from."""
    return [i for i, c in enumerate(caches) if compressible(c)]


def is_scoped(caches: list[Any], mla: bool) -> bool:
    """True when compression runs on a subset of the caches (or on MLA rows)."""
    return mla or len(targets(caches)) != len(caches)


def check_policy(policy: Policy, model_name: str, caches: list[Any], mla: bool) -> None:
    """Refuse what cannot run on this layout, before anything changes."""
    if not targets(caches):
        raise UnsupportedModelError(f"compress is refused on {model_name}: no full-attention cache to evict from")
    if policy.needs_attention and is_scoped(caches, mla):
        what = "MLA caches store a shared latent, not per-head keys" if mla else "not every cache is full attention"
        raise UnsupportedModelError(
            f"{policy.name} on {model_name} is refused: it recomputes attention over every cache and {what}; "
            "use key_norm, keydiff, streaming_llm, random or quantize"
        )


def _keep_all(cache: Any) -> LayerDecision:
    toks = np.asarray(cache.visible_tokens, np.int64) if isinstance(cache, ScopeKVCache) else np.zeros(0, np.int64)
    empty = np.zeros(0, np.int64)
    return LayerDecision(
        len(toks), toks, empty, toks.copy(), empty, np.zeros(0, np.float32), np.zeros((1, 0), np.float32)
    )


def expand(decision: Decision, caches: list[Any], idx: list[int]) -> Decision:
    """The decision made on `caches[idx]` as one covering every cache (the others keep every row)."""
    by_index = dict(zip(idx, decision.layers))
    decision.layers = [by_index[i] if i in by_index else _keep_all(c) for i, c in enumerate(caches)]
    decision.extra = {**decision.extra, "layers_compressed": list(idx), "layers": len(caches)}
    return decision


def decide_scoped(
    decide: Any,
    policy: Policy,
    caches: list[Any],
    token_ids: list[int],
    model: nn.Module | None,
    keep_ratio: float | None,
    budget_tokens: int | None,
    bits: int | None,
) -> Decision:
    """`decide` on the compressible caches only, expanded to every cache."""
    idx = targets(caches)
    sub = [caches[i] for i in idx]
    decision: Decision = decide(policy, sub, token_ids, model, keep_ratio, budget_tokens, bits)
    return expand(decision, caches, idx)


def apply_scoped(apply: Any, caches: list[Any], decision: Decision) -> None:
    """`apply` (compression.apply_decision) on the compressible caches; the others must evict nothing."""
    if len(decision.layers) != len(caches):
        raise InvalidRequestError(f"decision has {len(decision.layers)} layers; the cache has {len(caches)}")
    for i, (c, layer) in enumerate(zip(caches, decision.layers)):
        if not compressible(c) and len(layer.evicted):
            raise UnsupportedModelError(
                f"the decision evicts rows from cache {i} ({type(c).__name__}), which compression leaves alone"
            )
    idx = targets(caches)
    sub = dataclasses.replace(decision, layers=[decision.layers[i] for i in idx])
    apply([caches[i] for i in idx], sub)
    decision.bytes_after, decision.quantized_bytes = sub.bytes_after, sub.quantized_bytes
