"""How each cache reads in the window: a short label per layer and a hover note.

A full-attention or sliding layer is rows of blocks; a recurrent-state layer
has no rows: it is a fixed-size state, so it is shown with its bytes and the
last token it absorbed (masking cannot reach what a state already absorbed).
Knows nothing about Qt.
"""

from __future__ import annotations

from typing import Any

from kvscope.engine.caches.adopted import AdoptedCache
from kvscope.engine.caches.sliding import SlidingScopeKVCache


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def layer_label(i: int, cache: Any) -> str:
    """A few characters for the layer axis, e.g. '3 attn', '4 win 512', '5 state'."""
    if isinstance(cache, SlidingScopeKVCache):
        return f"{i} win {cache.window}"
    if isinstance(cache, AdoptedCache):
        return f"{i} {'state' if cache.kind == 'recurrent' else cache.kind}"
    return f"{i} attn"


def layer_note(cache: Any) -> str:
    """One line for the hover text of a layer."""
    if isinstance(cache, SlidingScopeKVCache):
        return f"sliding window: attends the last {cache.window} positions (every row kept for edits)"
    if isinstance(cache, AdoptedCache):
        if cache.kind == "recurrent":
            last = cache.last_token_absorbed
            seen = f"has absorbed tokens 0–{last}" if last >= 0 else "has absorbed nothing yet"
            return f"recurrent state, no rows: {_kib(cache.nbytes)} fixed size, {seen} (a mask cannot reach it)"
        return f"{type(cache).__name__} (mlx-lm's own cache, {_kib(cache.nbytes)}): rows cannot be edited"
    return "full attention: one row per token"
