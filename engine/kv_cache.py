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

The two row sets are `RowStore`s (engine/row_store.py). Knows nothing about
tokens' text, blocks, sessions, RoPE or events: edits that
move positions take a `rotate(keys, delta)` function from the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask

from kvscope.engine.caches import prompt_cache
from kvscope.engine.row_store import RowStore, frozen, gather
from kvscope.engine.tensor_ops import concat_rows, slice_rows, take_rows

Rotate = Callable[[mx.array, int], mx.array]
RowMap = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]
_I64 = np.int64


class ScopeKVCache:
    """A per-layer KV cache with logical masking and physical row edits."""

    step = 256

    def __init__(self) -> None:
        self._live = RowStore()  # attended: visible rows, with spare capacity
        self._aside = RowStore()  # masked rows, exact size
        self._pos = np.zeros(0, _I64)  # position of each logical token (capacity)
        self._n_tokens = 0
        self._offset = 0  # next RoPE position

    # ------------------------------------------------------------ protocol
    @property
    def keys(self) -> mx.array | None:
        """The attended buffer (visible rows first, then spare capacity)."""
        return self._live.keys

    @property
    def values(self) -> mx.array | None:
        return self._live.values

    @property
    def offset(self) -> int:
        return self._offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n_new = keys.shape[2]
        live = self._live
        start, t, p = live.n, self._n_tokens, self._offset
        self._reserve(start + n_new, keys, values)
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
        return create_attention_mask(n, self._live.n, return_array, window_size)

    def size(self) -> int:
        return self._offset

    def empty(self) -> bool:
        return self._live.keys is None and self._aside.n == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last `n` logical tokens (rows and positions)."""
        n = min(self._n_tokens, n)
        if n <= 0:
            return 0
        cut = self._n_tokens - n
        self._live.keep(self._live.toks() < cut)
        self._aside.keep(self._aside.toks() < cut)
        self._n_tokens = cut
        self._sync_offset()
        return n

    @property
    def state(self) -> tuple[Any, ...]:
        """Every stored row in token order: (keys, values), plus the rows' tokens, visibility and
        the positions when the cache is not plain (caches.prompt_cache: mlx-lm's file protocol)."""
        return prompt_cache.state_of(self)

    @state.setter
    def state(self, v: tuple[Any, ...]) -> None:
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
        """Bytes of the stored rows (masked rows included: they are kept)."""
        keys = self._live.keys if self._live.keys is not None else self._aside.keys
        values = self._live.values if self._live.values is not None else self._aside.values
        if keys is None or values is None or keys.shape[2] == 0:
            return 0
        per_row = keys.nbytes // keys.shape[2] + values.nbytes // values.shape[2]
        return per_row * self.n_rows

    # ------------------------------------------------------------ reading
    @property
    def n_tokens(self) -> int:
        """Logical tokens this layer has seen (with or without a row)."""
        return self._n_tokens

    @property
    def n_rows(self) -> int:
        """Stored rows, visible or masked."""
        return self._live.n + self._aside.n

    @property
    def n_visible(self) -> int:
        return self._live.n

    @property
    def token_positions(self) -> np.ndarray:
        """`[n_tokens]` RoPE position of every logical token (read-only)."""
        return frozen(self._pos[: self._n_tokens])

    @property
    def visible_tokens(self) -> np.ndarray:
        """Logical tokens of the attended rows, ascending (read-only)."""
        return frozen(self._live.toks())

    @property
    def masked_tokens(self) -> np.ndarray:
        """Logical tokens of the rows kept aside by a mask, ascending (read-only)."""
        return frozen(self._aside.toks())

    @property
    def row_token(self) -> np.ndarray:
        """`[n_rows]` logical token of every stored row, ascending."""
        return np.union1d(self._live.toks(), self._aside.toks()).astype(_I64)

    @property
    def row_visible(self) -> np.ndarray:
        """`[n_rows]` whether each row of `row_token` is attended."""
        return np.isin(self.row_token, self._live.toks())

    @property
    def row_position(self) -> np.ndarray:
        return self._pos[self.row_token]

    @property
    def is_plain(self) -> bool:
        """True when rows are exactly tokens 0..n-1 at positions 0..n-1, all visible."""
        return self.plain_prefix_len() == self._n_tokens == self._live.n

    def plain_prefix_len(self) -> int:
        """Leading tokens 0..k-1 with visible rows at positions 0..k-1."""
        live = self._live.toks()
        m = min(len(live), self._n_tokens)
        ok = (live[:m] == np.arange(m)) & (self._pos[:m] == np.arange(m))
        bad = np.nonzero(~ok)[0]
        return int(bad[0]) if len(bad) else m

    def rows_of(self, lo: int, hi: int) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        """(keys, values, tokens, visible) of the stored rows of tokens [lo, hi), token order."""
        parts = []
        for rows, vis in ((self._live, True), (self._aside, False)):
            t = rows.toks()
            sel = (t >= lo) & (t < hi)
            if sel.any():
                k, v, toks = rows.take(sel)
                parts.append((k, v, toks, np.full(len(toks), vis)))
        if not parts:
            store = self._live if self._live.keys is not None else self._aside
            if store.keys is None or store.values is None:
                raise ValueError("the cache holds no rows yet")
            return store.keys[..., :0, :], store.values[..., :0, :], np.zeros(0, _I64), np.zeros(0, bool)
        toks = np.concatenate([p[2] for p in parts])
        order = np.argsort(toks, kind="stable")
        keys = concat_rows([p[0] for p in parts])
        values = concat_rows([p[1] for p in parts])
        if len(parts) > 1:
            keys, values = gather(keys, order), gather(values, order)
        return keys, values, toks[order], np.concatenate([p[3] for p in parts])[order]

    def tail_rows(self, m: int) -> tuple[mx.array, mx.array]:
        """Contiguous copies of the last `m` attended rows."""
        keys, values = self._live.kv()
        n = self._live.n
        return slice_rows(keys, n - m, n), slice_rows(values, n - m, n)

    # ------------------------------------------------------------ editing
    def set_visible(self, token_lo: int, token_hi: int, visible: bool) -> int:
        """Mask or unmask the rows of logical tokens [lo, hi). Returns rows changed.

        One gather per call; decode afterwards attends only the visible rows.
        """
        src, dst = (self._aside, self._live) if visible else (self._live, self._aside)
        t = src.toks()
        sel = (t >= token_lo) & (t < token_hi)
        if not sel.any():
            return 0
        keys, values, toks = src.take(sel)
        src.keep(~sel)
        dst.merge(keys, values, toks)
        return len(toks)

    def evict_tokens(self, tokens: np.ndarray) -> int:
        """Physically drop the rows of `tokens` (positions untouched). Returns rows dropped."""
        tokens = np.asarray(tokens, _I64)
        n = 0
        for rows in (self._live, self._aside):
            drop = np.isin(rows.toks(), tokens)
            if drop.any():
                n += int(drop.sum())
                rows.keep(~drop)
        return n

    def delete_tokens(self, lo: int, hi: int, d_pos: int = 0, rotate: Rotate | None = None) -> None:
        """Remove tokens [lo, hi): their rows and positions. Later tokens move down
        by `hi - lo` indices and by `d_pos` positions (keys re-rotated by `rotate`)."""
        self.evict_tokens(np.arange(lo, hi))
        for rows in (self._live, self._aside):
            rows.shift_from(hi, lo - hi, d_pos, rotate)
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
        m = keys.shape[2]
        positions = np.asarray(positions, _I64)
        visible = np.asarray(visible, bool)
        for rows in (self._live, self._aside):
            rows.shift_from(at, m, shift, rotate)
        pos = self._pos[: self._n_tokens]
        self._pos = np.concatenate([pos[:at], positions, pos[at:] + shift])
        self._n_tokens += m
        new = np.arange(at, at + m, dtype=_I64)
        for rows, sel in ((self._live, visible), (self._aside, ~visible)):
            if sel.any():
                idx = np.nonzero(sel)[0]
                rows.merge(gather(keys, idx), gather(values, idx), new[idx])
        self._sync_offset()

    def overwrite_rows(self, lo: int, keys: mx.array, values: mx.array) -> int:
        """Overwrite the K/V of tokens [lo, lo + m) where this layer holds them. Returns rows written."""
        m = keys.shape[2]
        written = 0
        for rows in (self._live, self._aside):
            t = rows.toks()
            sel = np.nonzero((t >= lo) & (t < lo + m))[0]
            if len(sel) and rows.keys is not None and rows.values is not None:
                src = mx.array((t[sel] - lo).astype(np.int32))
                dst = mx.array(sel.astype(np.int32))
                rows.keys[..., dst, :] = take_rows(keys, src)
                rows.values[..., dst, :] = take_rows(values, src)
                written += len(sel)
        return written

    def map_rows(self, fn: RowMap) -> None:
        """Replace every stored row's K/V by `fn(keys, values)` (same shapes), e.g. a quantization round trip."""
        for rows in (self._live, self._aside):
            if rows.n:
                keys, values = fn(*rows.kv())
                rows.set(keys, values, rows.toks())

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
        other._live, other._aside = self._live.copy(), self._aside.copy()
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
    ) -> ScopeKVCache:
        """Rebuild a cache from stored rows (e.g. a saved session). Raises ValueError if they disagree."""
        row_tokens = np.asarray(row_tokens, _I64)
        row_visible = np.asarray(row_visible, bool)
        pos = np.asarray(token_positions, _I64)
        n = len(pos)
        if row_tokens.ndim != 1 or row_visible.shape != row_tokens.shape or pos.ndim != 1:
            raise ValueError("row lists must be flat and of one length")
        if keys.shape[2] != len(row_tokens) or values.shape[2] != len(row_tokens):
            raise ValueError(f"{keys.shape[2]} key rows for {len(row_tokens)} row tokens")
        if len(row_tokens) and (np.any(np.diff(row_tokens) <= 0) or row_tokens[0] < 0 or row_tokens[-1] >= n):
            raise ValueError(f"row tokens must be increasing and within the {n} tokens")
        if n and (pos[0] < 0 or np.any(np.diff(pos) <= 0)):
            raise ValueError("token positions must be increasing non-negative integers")
        obj = cls()
        for rows, sel in ((obj._live, row_visible), (obj._aside, ~row_visible)):
            if sel.any():
                idx = np.nonzero(sel)[0]
                rows.set(gather(keys, idx), gather(values, idx), row_tokens[idx])
        obj._pos, obj._n_tokens = pos.copy(), n
        obj._sync_offset()
        return obj

    # ------------------------------------------------------------ internals
    def _sync_offset(self) -> None:
        self._offset = int(self._pos[self._n_tokens - 1]) + 1 if self._n_tokens else 0

    def _reserve(self, n_rows: int, keys: mx.array, values: mx.array) -> None:
        if len(self._pos) < self._n_tokens + keys.shape[2]:
            grown = np.zeros(self._n_tokens + keys.shape[2] + self.step, _I64)
            grown[: self._n_tokens] = self._pos[: self._n_tokens]
            self._pos = grown
        self._live.reserve(n_rows, keys, values, self.step)
