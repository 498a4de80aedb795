"""One layer's KV cache: a drop-in for mlx-lm's `KVCache` that can hide rows.

Promises:
- follows mlx-lm's cache protocol (`update_and_fetch`, `offset`, `state`,
  `meta_state`, `from_state`, `is_trimmable`, `trim`, `nbytes`, `make_mask`,
  `empty`, `size`), so any plain-attention mlx-lm model runs on it unmodified;
- is the *only* owner of this layer's bookkeeping: which logical tokens have
  rows, which rows are visible, and the RoPE position of every logical token
  (with or without a row). Others read it through read-only arrays and change
  it through the methods below; nothing keeps a copy that could drift;
- `offset` (the next RoPE position) is always one past the last token's
  position; it is never reset to a row count;
- masking is free at decode time: masked rows leave the attended buffer and
  wait aside for unmask, so `update_and_fetch` returns a prefix slice of one
  buffer, as mlx-lm's `KVCache` does, whatever is masked. mlx's causal mask is
  aligned to the lower right, so attention over the visible rows is exact for
  prefill chunks and decode alike.

Storage, with tokens 2-3 masked and token 4 evicted::

    token:     0  1  2  3  4  5  6
    position:  0  1  2  3  4  5  6      _pos[:n_tokens], strictly increasing
    attended:  0  1           5  6      keys[..., :n_visible, :], token order
    aside:           2  3               masked rows, token order, kept for unmask
    (token 4 has no row in this layer: evicted)

The two row sets are one `RowSets` (engine/row_sets.py). After a head-wise
eviction (`keep_head_tokens`) each KV head keeps its own rows, compacted to
the front of the buffer; heads holding fewer rows are padded with holes that
`head_mask` hides (engine/head_attention.py routes mlx-lm's attention through
it). Decode, prefill, mask/unmask, trim, eviction, quantization, copies and
`state` work per head; edits that move or overwrite rows (`rows_of` for
segments, `tail_rows`, delete, insert, overwrite) raise `InvalidRequestError`
before changing anything.

Knows nothing about tokens' text, blocks, sessions, RoPE or events: edits that
move positions take a `rotate(keys, delta)` function from the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask

from kvscope.engine.caches import prompt_cache
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.head_rows import HeadRowStore
from kvscope.engine.row_sets import RowMap, RowSets
from kvscope.engine.row_store import frozen
from kvscope.engine.tensor_ops import slice_rows

Rotate = Callable[[mx.array, int], mx.array]
_I64 = np.int64


class ScopeKVCache:
    """A per-layer KV cache with logical masking and physical row edits."""

    step = 256

    def __init__(self) -> None:
        self._rows = RowSets()  # attended rows (with spare capacity) + masked rows aside
        self._mask_owed = False  # head-wise with holes: attention has not asked for head_mask yet
        self._pos = np.zeros(0, _I64)  # position of each logical token (capacity)
        self._n_tokens = 0
        self._offset = 0  # next RoPE position

    # ------------------------------------------------------------ protocol
    @property
    def keys(self) -> mx.array | None:
        """The attended buffer (visible rows first, then spare capacity)."""
        return self._rows.live.keys

    @property
    def values(self) -> mx.array | None:
        return self._rows.live.values

    @property
    def offset(self) -> int:
        return self._offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        live = self._rows.live
        if isinstance(live, HeadRowStore):
            return self._append_per_head(live, keys, values)
        n_new = keys.shape[2]
        start, t, p = live.n, self._n_tokens, self._offset
        self._reserve_positions(n_new)
        live.reserve(start + n_new, keys, values, self.step)
        assert live.keys is not None and live.values is not None
        live.keys[..., start : start + n_new, :] = keys
        live.values[..., start : start + n_new, :] = values
        if n_new == 1:  # decode: scalar stores, the hot path
            live.tokens[start] = t
            self._pos[t] = p
        else:
            live.tokens[start : start + n_new] = np.arange(t, t + n_new)
            self._pos[t : t + n_new] = np.arange(p, p + n_new)
        live.n += n_new
        self._n_tokens += n_new
        self._offset += n_new
        return live.keys[..., : live.n, :], live.values[..., : live.n, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        # The key list is the visible rows + the new ones; its length sets the mask offset.
        return create_attention_mask(n, self._rows.live.n, return_array, window_size)

    def head_mask(self, n_q_heads: int, n_queries: int, n_keys: int) -> mx.array | None:
        """Boolean `[1, n_q_heads, n_queries, n_keys]` mask hiding each head's holes (causal over the
        new rows), or None when every head attends every fetched row (the plain path)."""
        live = self._rows.live
        if not isinstance(live, HeadRowStore) or not live.has_holes:
            return None
        self._mask_owed = False
        return live.attention_mask(n_q_heads, n_queries, n_keys)

    def size(self) -> int:
        return self._offset

    def empty(self) -> bool:
        return self._rows.live.keys is None and self._rows.aside.n == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last `n` logical tokens (rows and positions)."""
        n = min(self._n_tokens, n)
        if n <= 0:
            return 0
        cut = self._n_tokens - n
        self._rows.keep_below(cut)
        self._n_tokens = cut
        self._sync_offset()
        return n

    @property
    def state(self) -> tuple[Any, ...]:
        """Every stored row in token order: (keys, values), plus the rows' tokens, visibility and
        positions when the cache is edited (caches.prompt_cache: mlx-lm's file protocol; a
        head-wise layer gives (keys, values) with its holes: see `head_presence`)."""
        if self.n_columns == 0:
            return (None, None)
        return prompt_cache.state_tuple(self, *self._rows.rows(0, self._n_tokens))

    @state.setter
    def state(self, v: tuple[Any, ...]) -> None:
        self._mask_owed = False
        prompt_cache.set_state(self, v)

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self._offset), str(self._n_tokens))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        offset, n_tokens = int(v[0]), int(v[1])
        if (offset, n_tokens) != (self._offset, self._n_tokens):
            raise ValueError(f"meta state {v} does not match the {self._n_tokens} rows loaded")

    @classmethod
    def from_state(cls, state: tuple[Any, ...], meta_state: tuple[str, ...] | None = None) -> ScopeKVCache:
        obj = cls()
        obj.state = state
        if meta_state is not None:
            obj.meta_state = meta_state
        return obj

    @classmethod
    def merge(cls, caches: list[ScopeKVCache]) -> Any:
        """mlx-lm's batch cache of plain caches (an edited one is refused: caches.prompt_cache)."""
        return prompt_cache.merge(caches)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> Any:
        """mlx-lm's `QuantizedKVCache` with this plain cache's rows (an edited one is refused)."""
        return prompt_cache.to_quantized(self, group_size, bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (masked rows included: they are kept; head-wise: padding too)."""
        return self._rows.nbytes()

    # ------------------------------------------------------------ reading
    @property
    def n_tokens(self) -> int:
        """Logical tokens this layer has seen (with or without a row)."""
        return self._n_tokens

    @property
    def n_rows(self) -> int:
        """Stored rows, visible or masked (head-wise: tokens some head holds)."""
        if self.is_headwise:
            return len(self.row_token)
        return self._rows.live.n + self._rows.aside.n

    @property
    def n_visible(self) -> int:
        """Visible rows (head-wise: tokens some head attends)."""
        return len(self._rows.visible()) if self.is_headwise else self._rows.live.n

    @property
    def n_columns(self) -> int:
        """Rows stored per KV head, holes of head-wise layers included (what `nbytes` counts)."""
        return self._rows.live.n + self._rows.aside.n

    @property
    def is_headwise(self) -> bool:
        """True once a head-wise eviction gave this layer's KV heads their own rows."""
        return self._rows.is_headwise

    @property
    def n_kv_heads(self) -> int:
        return self._rows.n_kv_heads

    def head_tokens(self, visible: bool = True) -> list[np.ndarray]:
        """Per KV head, the logical tokens of its visible (or masked) rows, ascending."""
        return self._rows.head_tokens(visible)

    def visible_rows(self) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        """(keys, values, tokens, presence) of the visible rows, one per token in token order
        (`[1, kv_heads, n_visible, dim]`); head-wise: zeros where `presence` (`[kv_heads, n]`) is False."""
        live = self._rows.live
        if isinstance(live, HeadRowStore):
            return live.union_rows(live.toks() >= 0)
        keys, values = live.kv()
        return keys, values, live.toks().copy(), np.ones((keys.shape[1], live.n), bool)

    def visible_presence(self) -> np.ndarray:
        """`[kv_heads, n_visible]`: whether each head attends each of `visible_tokens`."""
        live = self._rows.live
        if isinstance(live, HeadRowStore):
            return live.presence(live.token_list())
        return np.ones((self.n_kv_heads, live.n), bool)

    def head_presence(self) -> np.ndarray:
        """`[kv_heads, n_rows]`: whether each head holds each row of `row_token` (all True unless head-wise)."""
        return self._rows.presence()

    @property
    def token_positions(self) -> np.ndarray:
        """`[n_tokens]` RoPE position of every logical token (read-only)."""
        return frozen(self._pos[: self._n_tokens])

    @property
    def visible_tokens(self) -> np.ndarray:
        """Logical tokens of the attended rows, ascending (read-only)."""
        return frozen(self._rows.visible())

    @property
    def masked_tokens(self) -> np.ndarray:
        """Logical tokens of the rows kept aside by a mask, ascending (read-only)."""
        return frozen(self._rows.masked())

    @property
    def row_token(self) -> np.ndarray:
        """`[n_rows]` logical token of every stored row, ascending."""
        return self._rows.tokens()

    @property
    def row_visible(self) -> np.ndarray:
        """`[n_rows]` whether each row of `row_token` is attended."""
        return np.isin(self.row_token, self._rows.visible())

    @property
    def row_position(self) -> np.ndarray:
        return self._pos[self.row_token]

    @property
    def is_plain(self) -> bool:
        """True when rows are exactly tokens 0..n-1 at positions 0..n-1, all visible."""
        return self.plain_prefix_len() == self._n_tokens == self._rows.live.n

    def plain_prefix_len(self) -> int:
        """Leading tokens 0..k-1 with visible rows at positions 0..k-1 (0 on a head-wise layer)."""
        if self.is_headwise:
            return 0
        live = self._rows.live.toks()
        m = min(len(live), self._n_tokens)
        ok = (live[:m] == np.arange(m)) & (self._pos[:m] == np.arange(m))
        bad = np.nonzero(~ok)[0]
        return int(bad[0]) if len(bad) else m

    def rows_of(self, lo: int, hi: int) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        """(keys, values, tokens, visible) of the stored rows of tokens [lo, hi), token order."""
        self._require_uniform("reading rows as one row per token (segments, splices, row edits)")
        return self._rows.rows(lo, hi)

    def tail_rows(self, m: int) -> tuple[mx.array, mx.array]:
        """Contiguous copies of the last `m` attended rows."""
        self._require_uniform("reading the last rows")
        keys, values = self._rows.live.kv()
        n = self._rows.live.n
        return slice_rows(keys, n - m, n), slice_rows(values, n - m, n)

    # ------------------------------------------------------------ editing
    def set_visible(self, token_lo: int, token_hi: int, visible: bool) -> int:
        """Mask or unmask the rows of logical tokens [lo, hi) (in every head). Returns rows changed.

        One gather per call; decode afterwards attends only the visible rows.
        """
        return self._rows.move(token_lo, token_hi, visible)

    def keep_head_tokens(self, kept: list[np.ndarray]) -> int:
        """Head-wise eviction: KV head h keeps the visible rows of `kept[h]` and drops its other
        visible rows (masked rows stay, positions untouched). Returns (head, row) pairs dropped.

        Raises:
            InvalidRequestError: wrong number of heads, or a layer kind whose rows other code
                reads per layer (sliding window, shared KV); nothing changes then.
        """
        if type(self) is not ScopeKVCache:
            raise InvalidRequestError(
                f"head-wise eviction needs a plain full-attention layer; this one is a {type(self).__name__} "
                "(its rows are read per layer by the model)"
            )
        if len(kept) != self.n_kv_heads:
            raise InvalidRequestError(f"head-wise decision has {len(kept)} heads; the layer has {self.n_kv_heads}")
        return self._rows.keep_heads(kept)

    def evict_tokens(self, tokens: np.ndarray) -> int:
        """Physically drop the rows of `tokens` (positions untouched). Returns rows dropped."""
        return self._rows.drop(np.asarray(tokens, _I64))

    def delete_tokens(self, lo: int, hi: int, d_pos: int = 0, rotate: Rotate | None = None) -> None:
        """Remove tokens [lo, hi): their rows and positions. Later tokens move down
        by `hi - lo` indices and by `d_pos` positions (keys re-rotated by `rotate`)."""
        self._require_uniform("deleting tokens")
        self.evict_tokens(np.arange(lo, hi))
        self._rows.shift_from(hi, lo - hi, d_pos, rotate)
        pos = self._pos[: self._n_tokens]
        self._pos = np.concatenate([pos[:lo], pos[hi:] + d_pos])
        self._n_tokens -= hi - lo
        self._sync_offset()

    def insert_tokens(
        self,
        at: int,
        keys: mx.array,
        values: mx.array,
        positions: np.ndarray,
        visible: np.ndarray,
        shift: int = 0,
        rotate: Rotate | None = None,
    ) -> None:
        """Insert m tokens with rows before logical token `at`.

        Tokens from `at` on move up by m indices and by `shift` positions (keys
        re-rotated by `rotate`); the new tokens sit at `positions`, their rows
        visible where `visible` says.
        """
        self._require_uniform("inserting tokens")
        m = keys.shape[2]
        positions = np.asarray(positions, _I64)
        self._rows.shift_from(at, m, shift, rotate)
        pos = self._pos[: self._n_tokens]
        self._pos = np.concatenate([pos[:at], positions, pos[at:] + shift])
        self._n_tokens += m
        self._rows.add(keys, values, np.arange(at, at + m, dtype=_I64), np.asarray(visible, bool))
        self._sync_offset()

    def overwrite_rows(self, lo: int, keys: mx.array, values: mx.array) -> int:
        """Overwrite the K/V of tokens [lo, lo + m) where this layer holds them. Returns rows written."""
        self._require_uniform("overwriting rows")
        return self._rows.overwrite(lo, keys, values)

    def map_rows(self, fn: RowMap) -> None:
        """Replace every stored row's K/V by `fn(keys, values)` (same shapes), e.g. a quantization round trip."""
        self._rows.map(fn)

    def truncated(self, n_tokens: int) -> ScopeKVCache:
        """A copy holding only logical tokens < n_tokens (rows, masks and positions)."""
        other = self.copy()
        other.trim(other.n_tokens - n_tokens)
        return other

    def advance_to(self, position: int) -> None:
        """Let the next token sit at `position` (a gap), e.g. to recompute at recorded positions."""
        if position < self._offset:
            raise ValueError(f"position {position} is before the next position {self._offset}")
        self._offset = int(position)

    def copy(self) -> ScopeKVCache:
        other = ScopeKVCache()
        other._rows = self._rows.copy()
        other._pos = self._pos[: self._n_tokens].copy()
        other._n_tokens, other._offset = self._n_tokens, self._offset
        return other

    @classmethod
    def from_rows(
        cls,
        keys: mx.array,
        values: mx.array,
        row_tokens: np.ndarray,
        row_visible: np.ndarray,
        token_positions: np.ndarray,
        head_presence: np.ndarray | None = None,
    ) -> ScopeKVCache:
        """Rebuild a cache from stored rows (e.g. a saved session). Raises ValueError if they disagree.

        `head_presence` (`[kv_heads, n_rows]`, as `head_presence()` wrote it) rebuilds a head-wise layer.
        """
        pos = np.asarray(token_positions, _I64)
        if pos.ndim != 1 or (len(pos) and (pos[0] < 0 or np.any(np.diff(pos) <= 0))):
            raise ValueError("token positions must be increasing non-negative integers")
        obj = cls()
        obj._rows = RowSets.from_rows(keys, values, row_tokens, row_visible, len(pos), head_presence)
        obj._pos, obj._n_tokens = pos.copy(), len(pos)
        obj._sync_offset()
        return obj

    # ------------------------------------------------------------ internals
    def _append_per_head(self, live: HeadRowStore, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self._mask_owed:  # a tripwire: without the mask, heads would attend their holes
            raise RuntimeError(
                "a head-wise compressed layer was attended without its per-head mask: the model's attention "
                "does not go through kvscope's masked attention (kvscope.engine.head_attention.install)"
            )
        n_new, t, p = keys.shape[2], self._n_tokens, self._offset
        self._reserve_positions(n_new)
        live.append(keys, values, t, self.step)
        self._pos[t : t + n_new] = np.arange(p, p + n_new)
        self._n_tokens += n_new
        self._offset += n_new
        self._mask_owed = live.has_holes
        return live.kv()

    def _require_uniform(self, what: str) -> None:
        if self.is_headwise:
            raise InvalidRequestError(
                f"{what} is refused on a head-wise compressed layer: its KV heads hold different rows, and "
                "this operation needs one row per token in every head (undo the compression, or replay it "
                "after the edit)"
            )

    def _sync_offset(self) -> None:
        self._offset = int(self._pos[self._n_tokens - 1]) + 1 if self._n_tokens else 0

    def _reserve_positions(self, n_new: int) -> None:
        if len(self._pos) < self._n_tokens + n_new:
            grown = np.zeros(self._n_tokens + n_new + self.step, _I64)
            grown[: self._n_tokens] = self._pos[: self._n_tokens]
            self._pos = grown
