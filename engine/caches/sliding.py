"""A sliding-window layer's cache whose window is over *positions*, not storage slots.

mlx-lm's `RotatingKVCache` keeps the last `max_size` rows in a ring buffer,
so a row's slot says nothing about its position once anything is masked,
deleted or spliced. `SlidingScopeKVCache` is a `ScopeKVCache` (every row
kept, with the same token / position / visibility bookkeeping) that shows
the model only the visible rows inside the window:

    query at position q attends key rows with   q - window < position <= q

`make_mask` and `update_and_fetch` agree on that key list: the visible rows
some query of the chunk can still see (positions > first query - window),
then the new rows; the mask applies the window to each query. So masking,
unmasking, delete-with-shift and splicing stay exact on sliding layers (a
row that a closed gap brings back into the window is still there).

The model builds one window mask (from its first sliding cache) and uses it
for every sliding layer, so all sliding layers must hide the same rows;
masking a subset of them is refused (`check_layer_subset`).

Costs: memory grows like a full-attention layer (every row is kept);
attention reads at most `window` rows per query. Knows nothing about
sessions.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.caches import prompt_cache
from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.tensor_ops import take_rows


class WindowShare:
    """The window of the model's mask, shared by the sliding caches of one session.

    The model builds the mask from its first sliding cache and passes the
    window there only; every sliding layer must return the rows that mask covers.
    """

    def __init__(self) -> None:
        self.mask_window: int | None = None


class SlidingScopeKVCache(ScopeKVCache):
    """ScopeKVCache that attends only the last `window` positions."""

    kind = "sliding"

    def __init__(self, window: int, shared: WindowShare | None = None) -> None:
        super().__init__()
        self.window = int(window)
        self.shared = shared or WindowShare()
        self._last: tuple[mx.array, mx.array] | None = None

    def _visible_positions(self) -> np.ndarray:
        """Positions of the attended rows, in the order update_and_fetch returns them."""
        return self.token_positions[self.visible_tokens]

    @property
    def attended_window(self) -> int:
        """The window the model's mask uses (it may differ from the cache size mlx-lm chose:
        plamo3 masks window + 1 positions over a window-sized cache)."""
        return self.shared.mask_window or self.window

    def _in_window(self, vis_pos: np.ndarray, window: int) -> np.ndarray:
        return vis_pos > self.offset - window  # some query of this chunk (first at `offset`) can see it

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._last = self._fetch(keys, values)
        return self._last

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        """The rows the last `update_and_fetch` returned (shared-KV layers read them)."""
        if self._last is None:
            raise ValueError("no rows yet: the owning layer has not run in this forward pass")
        return self._last

    def _fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        vis_pos = self._visible_positions()
        keep = self._in_window(vis_pos, self.attended_window)
        k, v = super().update_and_fetch(keys, values)
        if keep.all():
            return k, v
        n_vis, n_new = len(vis_pos), keys.shape[2]
        first = int(np.argmax(keep)) if keep.any() else n_vis
        if keep[first:].all():  # the usual case: the window is a suffix of the rows
            return k[..., first:, :], v[..., first:, :]
        idx = mx.array(np.concatenate([np.nonzero(keep)[0], np.arange(n_vis, n_vis + n_new)]).astype(np.int32))
        return take_rows(k, idx), take_rows(v, idx)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        window = window_size or self.window
        self.shared.mask_window = window  # the other sliding layers select their rows with it too
        vis_pos = self._visible_positions()
        kpos = np.concatenate([vis_pos[self._in_window(vis_pos, window)], np.arange(self.offset, self.offset + n)])
        q = np.arange(self.offset, self.offset + n)[:, None]
        inside = kpos[None, :] > q - window
        if inside.all() and not return_array:  # the window cuts nothing: plain causal (lower-right aligned)
            return None if n == 1 else "causal"
        return mx.array((kpos[None, :] <= q) & inside)

    def copy(self) -> SlidingScopeKVCache:
        base = super().copy()
        other = SlidingScopeKVCache(self.window, self.shared)
        other.__dict__.update(base.__dict__)
        other.window, other.shared, other._last = self.window, self.shared, None
        return other

    @property
    def state(self) -> tuple[Any, ...]:
        """Rows, their tokens, visibility and positions, and the window (caches.prompt_cache)."""
        if self.n_rows == 0:
            return (None, None, None, None, None, self.window)
        return (*prompt_cache.state_tuple(self, *self.rows_of(0, self.n_tokens), always_full=True), self.window)

    @state.setter
    def state(self, v: tuple[Any, ...]) -> None:
        if len(v) != 6 or int(v[5]) != self.window:
            raise ValueError(f"a sliding-window state has 6 entries ending in the window {self.window}")
        prompt_cache.set_state(self, v[:5])

    @classmethod
    def from_state(cls, state: tuple[Any, ...], meta_state: tuple[str, ...] | None = None) -> Any:
        if len(state) != 6:
            raise ValueError(f"a sliding-window state has 6 entries (rows, bookkeeping, window), got {len(state)}")
        obj = cls(int(state[5]))
        obj.state = state
        return obj

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> Any:
        raise UnsupportedModelError(
            "a sliding-window cache is not quantized (as mlx-lm's RotatingKVCache: it has no quantized form)"
        )


def check_layer_subset(caches: list[Any], layers: list[int] | None) -> None:
    """Refuse masking some but not all sliding layers (they share one window mask in the model)."""
    if layers is None:
        return
    sliding = {i for i, c in enumerate(caches) if isinstance(c, SlidingScopeKVCache)}
    chosen = set(layers) & sliding
    if chosen and chosen != sliding:
        raise UnsupportedModelError(
            f"masking {len(chosen)} of the {len(sliding)} sliding-window layers is refused: the model builds one "
            "window mask for all of them, so they must hide the same tokens (mask all sliding layers or none)"
        )
