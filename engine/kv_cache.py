"""One layer's KV cache: a drop-in for mlx-lm's `KVCache` that can hide rows.

Promises:
- follows mlx-lm's cache protocol (`update_and_fetch`, `offset`, `state`,
  `meta_state`, `from_state`, `is_trimmable`, `trim`, `nbytes`, `make_mask`,
  `empty`, `size`), so any plain-attention mlx-lm model runs on it unmodified;
- keeps rows and positions apart: `offset` is the next RoPE position, `n_rows`
  the number of stored rows; masking, eviction and splicing change rows and
  never reset `offset` to the row count;
- `update_and_fetch` returns only the *visible* rows followed by the new ones.
  mlx's causal mask is aligned to the lower right, so attention over that
  shorter key list is exact for prefill chunks and decode alike.

Row bookkeeping, one entry per stored row (numpy, host side)::

    row:        0    1    2    3    4    5        <- storage order
    token:      0    1    2    3    4    5        <- logical token index in the session
    position:   0    1    2    3    4    5        <- RoPE position the key was rotated at
    visible:    T    T    F    F    T    T        <- masked rows stay stored

Knows nothing about tokens' text, blocks, sessions or events.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask

from kvscope.engine.tensor_ops import take_rows

_I64 = np.int64


class ScopeKVCache:
    """A per-layer KV cache with logical masking and physical row edits."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # next RoPE position
        self.n_rows = 0  # stored rows (visible or masked)
        self.next_token = 0  # logical token index the next appended row gets
        self.row_token = np.zeros(0, _I64)
        self.row_position = np.zeros(0, _I64)
        self.row_visible = np.zeros(0, bool)
        self._gather: mx.array | None = None  # visible row ids, None = all visible
        self._gather_valid = True
        self._gather_upto = 0

    # ------------------------------------------------------------ protocol
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n_new = keys.shape[2]
        start = self.n_rows
        self._reserve(start + n_new, keys, values)
        assert self.keys is not None and self.values is not None
        self.keys[..., start : start + n_new, :] = keys
        self.values[..., start : start + n_new, :] = values
        if n_new == 1:  # decode: scalar stores, the hot path
            self.row_token[start], self.row_position[start], self.row_visible[start] = (
                self.next_token,
                self.offset,
                True,
            )
        else:
            self.row_token[start : start + n_new] = np.arange(self.next_token, self.next_token + n_new)
            self.row_position[start : start + n_new] = np.arange(self.offset, self.offset + n_new)
            self.row_visible[start : start + n_new] = True
        self.n_rows += n_new
        self.offset += n_new
        self.next_token += n_new
        gather = self._visible_rows(start)
        if gather is None:
            return self.keys[..., : self.n_rows, :], self.values[..., : self.n_rows, :]
        idx = mx.concatenate([gather, mx.arange(start, start + n_new)])
        return take_rows(self.keys, idx), take_rows(self.values, idx)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        # The key list is visible rows + new rows; its length sets the mask offset.
        n_before = self.n_visible
        return create_attention_mask(n, n_before, return_array, window_size)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last `n` logical tokens (rows and positions)."""
        n = min(self.next_token, n)
        if n <= 0:
            return 0
        cut = self.next_token - n
        keep = self.row_token[: self.n_rows] < cut
        self.keep_rows(keep)
        self.next_token = cut
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        assert self.keys is not None and self.values is not None
        return self.keys[..., : self.n_rows, :], self.values[..., : self.n_rows, :]

    @state.setter
    def state(self, v: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = v
        n = self.keys.shape[2]
        self.n_rows = n
        self.row_token = np.arange(n, dtype=_I64)
        self.row_position = np.arange(n, dtype=_I64)
        self.row_visible = np.ones(n, bool)
        self._invalidate()

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset), str(self.next_token))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        self.offset, self.next_token = int(v[0]), int(v[1])

    @classmethod
    def from_state(cls, state: tuple[mx.array, mx.array], meta_state: tuple[str, ...] | None = None) -> ScopeKVCache:
        obj = cls()
        obj.state = state
        obj.offset = obj.next_token = obj.n_rows
        if meta_state is not None:
            obj.meta_state = meta_state
        return obj

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (masked rows included: they are kept)."""
        if self.keys is None or self.values is None or self.keys.shape[2] == 0:
            return 0
        per_row = (self.keys.nbytes // self.keys.shape[2]) + (self.values.nbytes // self.values.shape[2])
        return per_row * self.n_rows

    # ------------------------------------------------------------ kvscope
    @property
    def n_visible(self) -> int:
        return int(self.row_visible[: self.n_rows].sum())

    @property
    def is_plain(self) -> bool:
        """True when rows are exactly tokens 0..n-1 at positions 0..n-1, all visible."""
        n = self.n_rows
        return (
            n == self.next_token == self.offset
            and bool(self.row_visible[:n].all())
            and bool((self.row_position[:n] == np.arange(n)).all())
        )

    def set_visible(self, token_lo: int, token_hi: int, visible: bool) -> int:
        """Mask or unmask the rows of logical tokens [lo, hi). Returns rows changed."""
        tok = self.row_token[: self.n_rows]
        sel = (tok >= token_lo) & (tok < token_hi) & (self.row_visible[: self.n_rows] != visible)
        self.row_visible[: self.n_rows][sel] = visible
        if sel.any():
            self._invalidate()
        return int(sel.sum())

    def keep_rows(self, keep: np.ndarray) -> None:
        """Physically drop the rows where `keep` is False (positions untouched)."""
        keep = np.asarray(keep, bool)
        if keep.all():
            return
        kept = int(keep.sum())
        if keep[:kept].all():  # only a tail goes: no copy, the next append overwrites those rows
            self.n_rows = kept
            self._invalidate()
            return
        idx = np.nonzero(keep)[0]
        self._compact(idx)

    def insert_rows(
        self,
        at_row: int,
        keys: mx.array,
        values: mx.array,
        tokens: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        """Insert rows before storage row `at_row` with the given bookkeeping."""
        assert self.keys is not None and self.values is not None, "insert into an empty cache"
        n = self.n_rows
        k, v = self.state
        self.keys = mx.concatenate([k[..., :at_row, :], keys, k[..., at_row:, :]], axis=2)
        self.values = mx.concatenate([v[..., :at_row, :], values, v[..., at_row:, :]], axis=2)
        m = keys.shape[2]
        self.row_token = np.concatenate([self.row_token[:at_row], tokens, self.row_token[at_row:n]])
        self.row_position = np.concatenate([self.row_position[:at_row], positions, self.row_position[at_row:n]])
        self.row_visible = np.concatenate([self.row_visible[:at_row], np.ones(m, bool), self.row_visible[at_row:n]])
        self.n_rows = n + m
        self._invalidate()

    def replace_rows(self, rows: np.ndarray, keys: mx.array, values: mx.array) -> None:
        """Overwrite the K/V of storage rows `rows` (e.g. after re-rotation)."""
        assert self.keys is not None and self.values is not None
        idx = mx.array(np.asarray(rows, np.int32))
        self.keys[..., idx, :] = keys
        self.values[..., idx, :] = values

    def copy(self) -> ScopeKVCache:
        other = ScopeKVCache()
        if self.keys is not None and self.values is not None:
            k, v = self.state
            other.keys, other.values = mx.array(k), mx.array(v)
        other.offset, other.n_rows, other.next_token = self.offset, self.n_rows, self.next_token
        other.row_token = self.row_token[: self.n_rows].copy()
        other.row_position = self.row_position[: self.n_rows].copy()
        other.row_visible = self.row_visible[: self.n_rows].copy()
        other._invalidate()
        return other

    # ------------------------------------------------------------ internals
    def _reserve(self, n_rows: int, keys: mx.array, values: mx.array) -> None:
        cap = 0 if self.keys is None else self.keys.shape[2]
        if n_rows <= cap:
            return
        n_steps = (n_rows + self.step - 1) // self.step
        new_cap = n_steps * self.step
        b, h, _, dk = keys.shape
        dv = values.shape[3]
        new_k = mx.zeros((b, h, new_cap - self.n_rows, dk), keys.dtype)
        new_v = mx.zeros((b, h, new_cap - self.n_rows, dv), values.dtype)
        if self.keys is None or self.values is None:
            self.keys, self.values = new_k, new_v
        else:
            k, v = self.state
            self.keys = mx.concatenate([k, new_k], axis=2)
            self.values = mx.concatenate([v, new_v], axis=2)
        for name in ("row_token", "row_position", "row_visible"):
            old = getattr(self, name)
            grown = np.zeros(new_cap, old.dtype)
            grown[: self.n_rows] = old[: self.n_rows]
            setattr(self, name, grown)

    def _compact(self, idx: np.ndarray) -> None:
        assert self.keys is not None and self.values is not None
        gather = mx.array(idx.astype(np.int32))
        self.keys = take_rows(self.keys, gather)
        self.values = take_rows(self.values, gather)
        self.row_token = self.row_token[idx].copy()
        self.row_position = self.row_position[idx].copy()
        self.row_visible = self.row_visible[idx].copy()
        self.n_rows = len(idx)
        self._invalidate()

    def _invalidate(self) -> None:
        self._gather_valid = False

    def _visible_rows(self, n_before: int) -> mx.array | None:
        """Gather index of the visible rows among the first `n_before` rows."""
        if not self._gather_valid:
            vis = self.row_visible[:n_before]
            self._gather = None if vis.all() else mx.array(np.nonzero(vis)[0].astype(np.int32))
            self._gather_upto = n_before
            self._gather_valid = True
        elif self._gather is not None and self._gather_upto < n_before:
            # Rows appended since the last rebuild: extend the index on the host side.
            lo = self._gather_upto
            tail = np.arange(lo, n_before, dtype=np.int32)[self.row_visible[lo:n_before]]
            self._gather = mx.concatenate([self._gather, mx.array(tail)])
            self._gather_upto = n_before
        return self._gather
