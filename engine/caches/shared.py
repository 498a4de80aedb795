"""Caches that other layers read: the shared-KV kind (gemma3n, gemma4, afm7).

In these models the last layers keep no cache of their own; they read the
rows an earlier layer attended in the same forward pass through
`cache.keys_and_values()`. `SharedSourceKVCache` is a `ScopeKVCache` that
remembers exactly what its last `update_and_fetch` returned (the visible
rows plus the new ones), so the reading layers see the same rows, masking
and all. Knows nothing about sessions.
"""

from __future__ import annotations

import mlx.core as mx

from kvscope.engine.kv_cache import ScopeKVCache


class SharedSourceKVCache(ScopeKVCache):
    """A full-attention cache whose last fetched rows other layers can read."""

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[mx.array, mx.array] | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._last = super().update_and_fetch(keys, values)
        return self._last

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        """The rows the owning layer attended in this forward pass."""
        if self._last is None:
            raise ValueError("no rows yet: the owning layer has not run in this forward pass")
        return self._last

    def copy(self) -> SharedSourceKVCache:
        other = SharedSourceKVCache()
        other.__dict__.update(super().copy().__dict__)
        other._last = None
        return other
