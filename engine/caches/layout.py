"""The model's cache layout, read from its own `make_cache()`, and the session's caches.

Promises:
- `detect_layout(model)` asks mlx-lm's `make_prompt_cache` (which defers to
  the model's `make_cache()`) for the caches and classifies each one; it
  never runs the model, so it cannot crash on a cache type the model does
  not use;
- `make_session_caches(model)` lays a session out the same way: a plain
  `KVCache` becomes kvscope's `ScopeKVCache`, a `RotatingKVCache` a
  `SlidingScopeKVCache` (window over positions), every other kind is the
  model's own cache adopted with kvscope's bookkeeping;
- models whose later layers read an earlier layer's KV (shared-KV layers,
  gemma3n/gemma4) get fewer caches than layers, exactly as mlx-lm.

Knows nothing about sessions or RoPE.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from kvscope.engine.caches import prompt_cache
from kvscope.engine.caches.adopted import adopt, kind_of
from kvscope.engine.caches.shared import SharedSourceKVCache
from kvscope.engine.caches.sliding import SlidingScopeKVCache, WindowShare
from kvscope.engine.kv_cache import ScopeKVCache

prompt_cache.register()  # mlx-lm's load_prompt_cache finds kvscope's classes by name

KIND_LABELS = {
    "attention": "full attention",
    "sliding": "sliding-window attention",
    "chunked": "chunked attention",
    "quantized": "quantized KV",
    "recurrent": "recurrent state (SSM / linear attention)",
    "other": "composite cache",
}


@dataclass(frozen=True)
class CacheEntry:
    """One cache of the layout."""

    index: int
    kind: str
    cls: str  # mlx-lm class name
    window: int | None  # sliding window / chunk size in tokens

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "class": self.cls, "window": self.window}


@dataclass(frozen=True)
class CacheLayout:
    """The caches a model asks for, in the order it reads them."""

    n_model_layers: int
    entries: tuple[CacheEntry, ...]

    @property
    def n_caches(self) -> int:
        return len(self.entries)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(e.kind for e in self.entries)

    @property
    def is_plain(self) -> bool:
        """Every cache is a full-attention KV cache."""
        return all(e.kind == "attention" for e in self.entries)

    @property
    def rows_only(self) -> bool:
        """Every cache keeps per-token rows kvscope manages (full or sliding attention)."""
        return all(e.kind in ("attention", "sliding") for e in self.entries)

    @property
    def n_shared_kv_layers(self) -> int:
        """Layers that read another layer's KV instead of keeping their own."""
        return max(0, self.n_model_layers - self.n_caches)

    def indices(self, kind: str) -> list[int]:
        return [e.index for e in self.entries if e.kind == kind]

    def describe(self) -> str:
        """E.g. '36 recurrent state (SSM / linear attention), 12 full attention'."""
        parts = [f"{n} {KIND_LABELS.get(k, k)}" for k, n in self.kinds.most_common()]
        shared = f"; {self.n_shared_kv_layers} layers share another layer's KV" if self.n_shared_kv_layers else ""
        return ", ".join(parts) + shared

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_layers": self.n_model_layers,
            "caches": self.n_caches,
            "kinds": dict(self.kinds),
            "shared_kv_layers": self.n_shared_kv_layers,
            "entries": [e.as_dict() for e in self.entries],
        }


def _window(cache: Any) -> int | None:
    for attr in ("max_size", "chunk_size"):
        v = getattr(cache, attr, None)
        if isinstance(v, int):
            return v
    return None


def _n_model_layers(model: nn.Module, n_caches: int) -> int:
    layers = getattr(model, "layers", None)
    try:
        return len(layers) if layers is not None else n_caches
    except TypeError:
        return n_caches


def detect_layout(model: nn.Module) -> CacheLayout:
    """Classify the caches `make_prompt_cache(model)` builds (the model is not run)."""
    caches = make_prompt_cache(model)
    entries = tuple(
        CacheEntry(i, "attention" if type(c).__name__ == "KVCache" else kind_of(c), type(c).__name__, _window(c))
        for i, c in enumerate(caches)
    )
    return CacheLayout(_n_model_layers(model, len(entries)), entries)


def make_session_caches(model: nn.Module) -> list[Any]:
    """A fresh cache list for a session, laid out as the model's own `make_cache()`."""
    out: list[Any] = []
    caches = make_prompt_cache(model)
    shared = _n_model_layers(model, len(caches)) > len(caches)  # later layers read these caches' rows
    window = WindowShare()
    for c in caches:
        name = type(c).__name__
        if name == "KVCache":
            out.append(SharedSourceKVCache() if shared else ScopeKVCache())
        elif name == "RotatingKVCache" and c.keep == 0:
            out.append(SlidingScopeKVCache(c.max_size, window))
        else:
            out.append(adopt(c))
    return out
