"""Per-head masked attention for head-wise compressed caches, on mlx-lm models unmodified.

mlx-lm builds one attention mask per forward pass (from the first layer's
cache) and shares it across layers, so a mask cannot say that head 2 of
layer 5 lacks a row. Every mlx-lm attention, though, calls its module's
`scaled_dot_product_attention(queries, keys, values, cache=cache, ...)`
with *its own layer's cache*. `install(model)` wraps that function in the
model's modules: when the cache is a head-wise `ScopeKVCache` with holes, the
wrapper asks it for `head_mask(...)` (boolean, `[1, q_heads, L, N]`, each
KV head's mask repeated over its query heads as mlx's GQA expects) and ANDs
it with the model's own mask; otherwise it passes the call through
untouched, so uniform caches keep mlx's fast path.

kvpress fakes head-wise eviction instead (it keeps every row and swaps the
evicted keys for a key whose logit is -1e5, `attention_patch.py`): no memory
is freed. Here the rows are gone and only padding is masked.

A head-wise cache whose attention never asked for its mask raises on the
next step (`ScopeKVCache._append_per_head`), so a model this wrapper does not
reach fails loudly rather than attending padding. Knows nothing about policies.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_MARK = "_kvscope_head_mask"
NAME = "scaled_dot_product_attention"


def _combine(mask: Any, head: mx.array) -> mx.array:
    """The model's mask (None, "causal" or an array) AND the per-head mask."""
    if mask is None or isinstance(mask, str):
        return head  # head_mask already applies the causal rule to the new rows
    if mask.dtype == mx.bool_:
        return head & mask
    return mx.where(head, mask, mx.array(-mx.inf, mask.dtype))


def _wrap(sdpa: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def masked_sdpa(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, *args: Any, **kw: Any) -> mx.array:
        head_mask = getattr(cache, "head_mask", None)
        if head_mask is not None:
            head = head_mask(queries.shape[1], queries.shape[2], keys.shape[2])
            if head is not None:
                if "mask" in kw:
                    kw["mask"] = _combine(kw["mask"], head)
                elif len(args) >= 2:  # (scale, mask, ...) positionally
                    args = (args[0], _combine(args[1], head), *args[2:])
                else:
                    kw["mask"] = head
        return sdpa(queries, keys, values, cache, *args, **kw)

    setattr(masked_sdpa, _MARK, True)
    return masked_sdpa


def install(model: nn.Module) -> bool:
    """Route the model's attention through the per-head mask (idempotent).

    Returns:
        True when every attention module of the model lives in a module whose
        `scaled_dot_product_attention` is now wrapped, so head-wise caches are
        safe to use with it; False otherwise (head-wise eviction is then refused).
    """
    modules = {type(m).__module__ for _, m in model.named_modules()}
    for name in modules:
        mod = sys.modules.get(name)
        fn = getattr(mod, NAME, None) if mod is not None else None
        if fn is not None and callable(fn) and not getattr(fn, _MARK, False):
            setattr(mod, NAME, _wrap(fn))
    return covers(model)


def covers(model: nn.Module) -> bool:
    """True when every layer's `self_attn` calls a wrapped `scaled_dot_product_attention`."""
    layers = getattr(model, "layers", None) or getattr(getattr(model, "model", None), "layers", None)
    attns = [getattr(layer, "self_attn", None) for layer in layers or []]
    if not attns or any(a is None for a in attns):
        return False
    return all(getattr(getattr(sys.modules.get(type(a).__module__), NAME, None), _MARK, False) for a in attns)


def require(model: nn.Module | None) -> None:
    """Install the per-head mask on `model`, or raise `UnsupportedModelError` if it cannot reach
    every attention layer (None: a bare-cache caller; the cache's tripwire still guards)."""
    from kvscope.engine.errors import UnsupportedModelError

    if model is not None and not install(model):
        raise UnsupportedModelError(
            f"head-wise compression needs mlx-lm attention layers that call scaled_dot_product_attention "
            f"with their cache; {type(model).__module__} does not, so per-head masks cannot reach them"
        )
