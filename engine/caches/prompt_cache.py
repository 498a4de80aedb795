"""mlx-lm's prompt-cache protocol for kvscope's caches: state, from_state, merge, to_quantized, files.

mlx-lm's `save_prompt_cache` writes every cache's `state` (arrays and
scalars) and its class name; `load_prompt_cache` rebuilds each cache with
`<class>.from_state(state)`, looking the class up **by name in the
namespace of `mlx_lm.models.cache`** (mlx-lm >= 0.32.2; before, it also
passed `meta_state`, which kvscope's `from_state` accepts too). So that
files of kvscope caches load there, `register()` (run when kvscope's cache
layout module is imported) adds kvscope's classes to that namespace under
their own names. It adds names only and replaces nothing of mlx-lm's; a
name already taken by something else is an error, not an overwrite.

`state` of a kvscope row cache::

    plain (rows = tokens 0..n-1 at positions 0..n-1, all visible)
        ScopeKVCache          (keys, values)                        rows in token order
    edited (masked, evicted, spliced)
        ScopeKVCache          (keys, values, row_tokens, row_visible, token_positions)
    sliding window            (keys, values, row_tokens, row_visible, token_positions, window)

so a round trip keeps every row, mask and position. Adopted mlx-lm caches
(recurrent states, ...) are instances of mlx-lm's own classes under their
own names: their files load as mlx-lm's caches with nothing of kvscope's.

`merge` (batching, mlx-lm's `BatchGenerator`) and `to_quantized` (mlx-lm's
`kv_bits`) hand over to mlx-lm's own batch and quantized caches. Those
count positions by rows, so they take a plain cache only; an edited one is
refused with `UnsupportedModelError` (its rows are not its positions), never
converted into a cache that attends the wrong rows. A sliding cache
quantizes as mlx-lm's `RotatingKVCache` does: not at all.

Knows nothing about sessions.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from kvscope.engine.errors import UnsupportedModelError

_I32 = np.int32


def register() -> None:
    """Make kvscope's cache classes findable by `load_prompt_cache` (by their own names)."""
    from kvscope.engine.caches.shared import SharedSourceKVCache
    from kvscope.engine.caches.sliding import SlidingScopeKVCache
    from kvscope.engine.kv_cache import ScopeKVCache

    for cls in (ScopeKVCache, SlidingScopeKVCache, SharedSourceKVCache):
        have = getattr(mlx_cache, cls.__name__, None)
        if have is not None and have is not cls:
            raise RuntimeError(f"mlx_lm.models.cache already defines {cls.__name__}: kvscope will not replace it")
        setattr(mlx_cache, cls.__name__, cls)


# ---------------------------------------------------------------- state
def state_tuple(
    cache: Any, keys: mx.array, values: mx.array, toks: np.ndarray, vis: np.ndarray, always_full: bool = False
) -> tuple[Any, ...]:
    """The `state` tuple of a kvscope row cache from its stored rows (see the module docstring)."""
    if (cache.is_plain or cache.is_headwise) and not always_full:
        return keys, values
    return (
        keys,
        values,
        mx.array(np.asarray(toks).astype(_I32)),
        mx.array(np.asarray(vis).astype(_I32)),
        mx.array(np.asarray(cache.token_positions, _I32)),
    )


def set_state(cache: Any, state: Any) -> None:
    """Load a `state` tuple (2 or 5 entries) into an empty kvscope row cache."""
    from kvscope.engine.kv_cache import ScopeKVCache

    state = tuple(state)
    if len(state) not in (2, 5):
        raise ValueError(f"a kvscope cache state has 2 or 5 entries, got {len(state)}")
    keys, values = state[:2]
    if keys is None:
        return
    if len(state) == 2:
        n = keys.shape[2]
        toks, vis, pos = np.arange(n), np.ones(n, bool), np.arange(n)
    else:
        toks, vis, pos = (np.asarray(a).astype(np.int64) for a in state[2:])
    fresh = ScopeKVCache.from_rows(keys, values, toks, vis.astype(bool), pos)
    cache.__dict__.update(vars(fresh))  # the row bookkeeping only: a subclass keeps its own fields


# ---------------------------------------------------------------- hand-over to mlx-lm's caches
def _require_plain(cache: Any, what: str) -> None:
    if not cache.is_plain:
        raise UnsupportedModelError(
            f"{what} is refused on this {type(cache).__name__}: mlx-lm's cache counts positions by rows, and this one "
            f"holds {cache.n_visible} visible rows for {cache.offset} positions (masked, evicted or spliced)"
        )


def to_quantized(cache: Any, group_size: int, bits: int) -> mlx_cache.QuantizedKVCache:
    """mlx-lm's `QuantizedKVCache` holding this plain cache's rows."""
    _require_plain(cache, "quantizing")
    out: Any = mlx_cache.QuantizedKVCache(group_size=group_size, bits=bits)
    if cache.n_rows:
        keys, values = cache.state[:2]
        out.keys = mx.quantize(keys, group_size=group_size, bits=bits)
        out.values = mx.quantize(values, group_size=group_size, bits=bits)
        out.offset = cache.offset
    return out


def as_rotating(cache: Any) -> mlx_cache.RotatingKVCache:
    """mlx-lm's `RotatingKVCache` of a plain sliding cache: its last `window` rows."""
    _require_plain(cache, "batching")
    out = mlx_cache.RotatingKVCache(max_size=cache.window)
    if cache.n_rows:
        keys, values = cache.state[:2]
        m = min(cache.window, keys.shape[2])
        out.state = (keys[..., -m:, :], values[..., -m:, :], cache.offset, 0, cache.window, m)
    return out


def merge(caches: Any) -> Any:
    """mlx-lm's batch cache of several plain kvscope caches (mlx-lm's `BatchGenerator` calls this)."""
    from kvscope.engine.caches.sliding import SlidingScopeKVCache

    caches = list(caches)
    if caches and all(isinstance(c, SlidingScopeKVCache) for c in caches):
        return mlx_cache.BatchRotatingKVCache.merge([as_rotating(c) for c in caches])
    for c in caches:
        _require_plain(c, "batching")
    return mlx_cache.BatchKVCache.merge(caches)
