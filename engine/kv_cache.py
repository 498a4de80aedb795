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

The two row sets are `RowStore`s (engine/row_store.py). After a head-wise
eviction (`keep_head_tokens`) both become `HeadRowStore`s (engine/head_rows.py):
each KV head keeps its own rows, compacted to the front of the buffer, and
heads holding fewer rows are padded with holes that `head_mask` hides in
attention (engine/head_attention.py routes mlx-lm's attention through it).
A token's row is visible or masked alike in every head that holds it. On a
head-wise layer, decode, prefill, mask/unmask, trim, eviction, quantization,
copies and `state` work; edits that move or overwrite rows (`rows_of` for
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

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.head_rows import HeadRowStore
from kvscope.engine.row_store import RowStore, frozen, gather
from kvscope.engine.tensor_ops import concat_rows, slice_rows, take_rows

Rotate = Callable[[mx.array, int], mx.array]
RowMap = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]
_I64 = np.int64


class ScopeKVCache:
    """A per-layer KV cache with logical masking and physical row edits."""

    step = 256

    def __init__(self) -> None:
        self._live: RowStore | HeadRowStore = RowStore()  # attended: visible rows, with spare capacity
        self._aside: RowStore | HeadRowStore = RowStore()  # masked rows, exact size
        self._mask_owed = False  # head-wise with holes: attention has not asked for head_mask yet
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
        if isinstance(self._live, HeadRowStore):
            return self._append_per_head(keys, values)
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

    def head_mask(self, n_q_heads: int, n_queries: int, n_keys: int) -> mx.array | None:
        """Boolean `[1, n_q_heads, n_queries, n_keys]` mask hiding each head's holes (causal over the
        new rows), or None when every head attends every fetched row (the plain path)."""
        live = self._live
        if not isinstance(live, HeadRowStore) or not live.has_holes:
            return None
        self._mask_owed = False
        return live.attention_mask(n_q_heads, n_queries, n_keys)

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
    def state(self) -> tuple[mx.array, mx.array]:
        """Every stored row (visible and masked) in token order."""
        keys, values, _, _ = self._rows(0, self._n_tokens)
        return keys, values

    @state.setter
    def state(self, v: tuple[mx.array, mx.array]) -> None:
        keys, values = v
        n = keys.shape[2]
        self._live, self._aside, self._mask_owed = RowStore(), RowStore(), False
        self._live.set(keys, values, np.arange(n, dtype=_I64))
        self._pos = np.arange(n, dtype=_I64)
        self._n_tokens = n
        self._sync_offset()

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self._offset), str(self._n_tokens))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        offset, n_tokens = int(v[0]), int(v[1])
        if (offset, n_tokens) != (self._offset, self._n_tokens):
            raise ValueError(f"meta state {v} does not match the {self._n_tokens} rows loaded")

    @classmethod
    def from_state(cls, state: tuple[mx.array, mx.array], meta_state: tuple[str, ...] | None = None) -> ScopeKVCache:
        obj = cls()
        obj.state = state
        if meta_state is not None:
            obj.meta_state = meta_state
        return obj

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (masked rows included: they are kept)."""
        keys = self._live.keys if self._live.keys is not None else self._aside.keys
        values = self._live.values if self._live.values is not None else self._aside.values
        if keys is None or values is None or keys.shape[2] == 0:
            return 0
        per_row = keys.nbytes // keys.shape[2] + values.nbytes // values.shape[2]
        return per_row * (self._live.n + self._aside.n)  # head-wise: columns held, holes included

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
        return self._live.n + self._aside.n

    @property
    def n_visible(self) -> int:
        """Visible rows (head-wise: tokens some head attends)."""
        return len(self._live.token_list()) if self.is_headwise else self._live.n

    @property
    def is_headwise(self) -> bool:
        """True once a head-wise eviction gave this layer's KV heads their own rows."""
        return isinstance(self._live, HeadRowStore)

    def head_tokens(self, visible: bool = True) -> list[np.ndarray]:
        """Per KV head, the logical tokens of its visible (or masked) rows, ascending."""
        rows = self._live if visible else self._aside
        if isinstance(rows, HeadRowStore):
            return [t[t >= 0].copy() for t in rows.toks()]
        n_heads = self.n_kv_heads
        return [rows.toks().copy() for _ in range(n_heads)]

    @property
    def n_kv_heads(self) -> int:
        keys = self._live.keys if self._live.keys is not None else self._aside.keys
        return 0 if keys is None else int(keys.shape[1])

    @property
    def token_positions(self) -> np.ndarray:
        """`[n_tokens]` RoPE position of every logical token (read-only)."""
        return frozen(self._pos[: self._n_tokens])

    @property
    def visible_tokens(self) -> np.ndarray:
        """Logical tokens of the attended rows, ascending (read-only)."""
        return frozen(self._live.token_list())

    @property
    def masked_tokens(self) -> np.ndarray:
        """Logical tokens of the rows kept aside by a mask, ascending (read-only)."""
        return frozen(self._aside.token_list())

    @property
    def row_token(self) -> np.ndarray:
        """`[n_rows]` logical token of every stored row, ascending."""
        return np.union1d(self._live.token_list(), self._aside.token_list()).astype(_I64)

    @property
    def row_visible(self) -> np.ndarray:
        """`[n_rows]` whether each row of `row_token` is attended."""
        return np.isin(self.row_token, self._live.token_list())

    @property
    def row_position(self) -> np.ndarray:
        return self._pos[self.row_token]

    @property
    def is_plain(self) -> bool:
        """True when rows are exactly tokens 0..n-1 at positions 0..n-1, all visible."""
        return self.plain_prefix_len() == self._n_tokens == self._live.n

    def plain_prefix_len(self) -> int:
        """Leading tokens 0..k-1 with visible rows at positions 0..k-1 (0 on a head-wise layer)."""
        if isinstance(self._live, HeadRowStore):
            return 0
        live = self._live.toks()
        m = min(len(live), self._n_tokens)
        ok = (live[:m] == np.arange(m)) & (self._pos[:m] == np.arange(m))
        bad = np.nonzero(~ok)[0]
        return int(bad[0]) if len(bad) else m

    def rows_of(self, lo: int, hi: int) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        """(keys, values, tokens, visible) of the stored rows of tokens [lo, hi), token order."""
        self._require_uniform("reading rows as one row per token (segments, splices, row edits)")
        return self._rows(lo, hi)

    def head_presence(self) -> np.ndarray:
        """`[kv_heads, n_rows]`: whether each head holds each row of `row_token` (all True unless head-wise)."""
        toks = self.row_token
        if not self.is_headwise:
            return np.ones((self.n_kv_heads, len(toks)), bool)
        live, aside = self._live, self._aside
        assert isinstance(live, HeadRowStore) and isinstance(aside, HeadRowStore)
        return live.presence(toks) | aside.presence(toks)

    def _rows(self, lo: int, hi: int) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        # Head-wise layers: one row per token some head holds, zeros where a head does not (see head_presence).
        parts = []
        for rows, vis in ((self._live, True), (self._aside, False)):
            t = rows.toks()
            sel = (t >= lo) & (t < hi)
            if sel.any():
                if isinstance(rows, HeadRowStore):
                    k, v, toks, _ = rows.union_rows(sel)
                else:
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
        self._require_uniform("reading the last rows")
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
        dst.merge(keys, values, toks)  # type: ignore[arg-type]
        return len(toks) if toks.ndim == 1 else len(np.unique(toks[toks >= 0]))

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
        if not self.is_headwise:
            self._live, self._aside = _per_head(self._live, self._aside), _per_head(self._aside, self._live)
        live = self._live
        toks = live.toks()
        keep = np.stack([np.isin(toks[h], np.asarray(kept[h], _I64)) for h in range(len(kept))])
        dropped = int(((toks >= 0) & ~keep).sum())
        live.keep(keep)
        return dropped

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
        self._require_uniform("deleting tokens")
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
        self._require_uniform("inserting tokens")
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
        self._require_uniform("overwriting rows")
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
        head_presence: np.ndarray | None = None,
    ) -> ScopeKVCache:
        """Rebuild a cache from stored rows (e.g. a saved session). Raises ValueError if they disagree.

        `head_presence` (`[kv_heads, n_rows]`, as `head_presence()` wrote it) rebuilds a head-wise layer.
        """
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
        if head_presence is not None and not np.asarray(head_presence, bool).all():
            obj._split_heads(np.asarray(head_presence, bool), row_visible)
        return obj

    def _split_heads(self, presence: np.ndarray, row_visible: np.ndarray) -> None:
        if presence.shape != (self.n_kv_heads, len(row_visible)):
            raise ValueError(
                f"head presence is {presence.shape}, not [kv heads, rows] = {(self.n_kv_heads, len(row_visible))}"
            )
        self._live, self._aside = _per_head(self._live, self._aside), _per_head(self._aside, self._live)
        for rows, sel in ((self._live, row_visible), (self._aside, ~row_visible)):
            rows.keep(presence[:, sel])

    # ------------------------------------------------------------ internals
    def _append_per_head(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        live = self._live
        assert isinstance(live, HeadRowStore)
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

    def _reserve(self, n_rows: int, keys: mx.array, values: mx.array) -> None:
        self._reserve_positions(keys.shape[2])
        assert isinstance(self._live, RowStore)
        self._live.reserve(n_rows, keys, values, self.step)

    def _reserve_positions(self, n_new: int) -> None:
        if len(self._pos) < self._n_tokens + n_new:
            grown = np.zeros(self._n_tokens + n_new + self.step, _I64)
            grown[: self._n_tokens] = self._pos[: self._n_tokens]
            self._pos = grown


def _per_head(rows: RowStore | HeadRowStore, other: RowStore | HeadRowStore) -> HeadRowStore:
    """`rows` as a HeadRowStore in which every head holds every row (shaped like `other` when empty)."""
    if isinstance(rows, HeadRowStore):
        return rows
    if rows.n:
        return HeadRowStore.uniform(*rows.kv(), rows.toks())
    src = rows if rows.keys is not None else other
    assert src.keys is not None and src.values is not None, "the layer holds no rows"
    return HeadRowStore.uniform(src.keys[..., :0, :], src.values[..., :0, :], np.zeros(0, _I64))
