"""HeadRowStore: K/V rows kept per KV head, for a head-wise compressed `ScopeKVCache`.

After a head-wise eviction (AdaKV, per-head budgets) each KV head of a layer
holds its own set of logical tokens. Each head's rows are compacted to the
front of one buffer `[batch, kv_heads, columns, head_dim]`; a head holding
fewer rows than the longest one is padded with *holes* (token -1) that the
attention mask hides. Rows added later (decode, prefill) go to the same new
column in every head, so decode still appends in place and attention reads
one prefix slice of the buffer::

    column:      0   1   2   3   4 | 5   6        n = 7 used columns
    head 0:      0   3   7   9  -1 | 12  13       -1: a hole (masked out)
    head 1:      1   2   3   7   9 | 12  13
                 compacted at eviction  appended after

`tokens[h, c]` is the logical token of column c in head h; each head's
tokens are ascending, holes anywhere. `valid` mirrors `tokens >= 0` on the
device so the per-head mask costs no host copy per step. Every operation
that changes the set of rows costs one gather (`mx.take_along_axis`) and
re-compacts, which removes the holes it can.

Selections are `[kv_heads, n]` boolean arrays over `toks()`, so the same
predicates a uniform `RowStore` uses (`(t >= lo) & (t < hi)`, `np.isin`)
work here elementwise; holes never count as selected rows. Knows nothing
about positions, masks of the person, sessions or RoPE.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvscope.engine.tensor_ops import ROW_AXIS

_I64 = np.int64
HOLE = -1


def _compact_index(tokens: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column index [H, m], tokens [H, m]) of the selected entries of each head, in token order."""
    held = sel & (tokens >= 0)
    counts = held.sum(axis=1)
    m = int(counts.max()) if len(counts) else 0
    idx = np.zeros((tokens.shape[0], m), np.int32)
    out = np.full((tokens.shape[0], m), HOLE, _I64)
    for h in range(tokens.shape[0]):
        cols = np.nonzero(held[h])[0]
        cols = cols[np.argsort(tokens[h, cols], kind="stable")]
        idx[h, : len(cols)] = cols
        out[h, : len(cols)] = tokens[h, cols]
    return idx, out


def _take(x: mx.array, idx: np.ndarray) -> mx.array:
    """Per-head gather of columns: `x[b, h, idx[h, j], :]`."""
    b, h, _, d = x.shape
    ix = mx.broadcast_to(mx.array(idx)[None, :, :, None], (b, h, idx.shape[1], d))
    return mx.take_along_axis(x, ix, axis=ROW_AXIS)


class HeadRowStore:
    """Rows per KV head, compacted to the front, holes masked (see the module docstring)."""

    __slots__ = ("keys", "values", "tokens", "valid", "n", "has_holes")

    def __init__(self, keys: mx.array, values: mx.array, tokens: np.ndarray) -> None:
        self._set(keys, values, tokens)

    @classmethod
    def compact(cls, keys: mx.array, values: mx.array, tokens: np.ndarray, sel: np.ndarray) -> HeadRowStore:
        """The selected rows of `[B, H, n, D]` keys/values (tokens `[H, n]`), compacted per head."""
        idx, toks = _compact_index(np.asarray(tokens, _I64), np.asarray(sel, bool))
        return cls(_take(keys, idx), _take(values, idx), toks)

    @classmethod
    def uniform(cls, keys: mx.array, values: mx.array, tokens: np.ndarray) -> HeadRowStore:
        """Every head holds every row of `tokens` (a layer's rows before a head-wise edit)."""
        return cls(keys, values, np.tile(np.asarray(tokens, _I64)[None, :], (keys.shape[1], 1)))

    # ------------------------------------------------------------ reading
    @property
    def n_heads(self) -> int:
        return int(self.tokens.shape[0])

    def kv(self) -> tuple[mx.array, mx.array]:
        assert self.keys is not None and self.values is not None
        return self.keys[..., : self.n, :], self.values[..., : self.n, :]

    def toks(self) -> np.ndarray:
        """`[H, n]` logical token per used column, -1 for holes."""
        return self.tokens[:, : self.n]

    def token_list(self) -> np.ndarray:
        """Tokens held by at least one head, ascending."""
        t = self.toks()
        return np.unique(t[t >= 0]).astype(_I64)

    def held_counts(self) -> np.ndarray:
        """`[H]` rows each head holds."""
        return (self.toks() >= 0).sum(axis=1)

    def presence(self, tokens: np.ndarray) -> np.ndarray:
        """`[H, len(tokens)]` whether each head holds each of `tokens`."""
        return np.stack([np.isin(tokens, row) for row in self.toks()])

    def union_rows(self, sel: np.ndarray) -> tuple[mx.array, mx.array, np.ndarray, np.ndarray]:
        """(keys, values, tokens, presence) of the selected rows laid out by token: one row per token
        any head holds, zeros where a head does not hold it (files, `rows_of`)."""
        toks = self.toks()
        held = sel & (toks >= 0)
        union = np.unique(toks[held]).astype(_I64)
        idx = np.zeros((self.n_heads, len(union)), np.int32)
        presence = np.zeros((self.n_heads, len(union)), bool)
        for h in range(self.n_heads):
            cols = np.nonzero(held[h])[0]
            where = np.searchsorted(union, toks[h, cols])
            idx[h, where], presence[h, where] = cols, True
        keys, values = self.kv()
        pm = mx.array(presence)[None, :, :, None]
        zero = mx.array(0, keys.dtype)
        return mx.where(pm, _take(keys, idx), zero), mx.where(pm, _take(values, idx), zero), union, presence

    def attention_mask(self, n_q_heads: int, n_queries: int, n_keys: int) -> mx.array:
        """Boolean `[1, n_q_heads, n_queries, n_keys]` mask: holes hidden per head, the last
        `n_queries` keys causal to the queries (lower-right aligned, as mlx's "causal")."""
        group = n_q_heads // self.n_heads
        valid = self.valid[None, :, None, :n_keys]  # [1, Hkv, 1, N]
        if n_queries > 1:
            q = mx.arange(n_keys - n_queries, n_keys)[:, None]
            valid = valid & (mx.arange(n_keys)[None, :] <= q)[None, None]
        return mx.repeat(valid, group, axis=1) if group > 1 else valid

    # ------------------------------------------------------------ editing
    def append(self, keys: mx.array, values: mx.array, first_token: int, step: int) -> None:
        """Add one new column per new token, in every head."""
        m = keys.shape[ROW_AXIS]
        self._reserve(self.n + m, step)
        assert self.keys is not None and self.values is not None
        self.keys[..., self.n : self.n + m, :] = keys
        self.values[..., self.n : self.n + m, :] = values
        self.tokens[:, self.n : self.n + m] = np.arange(first_token, first_token + m)[None, :]
        if self.has_holes:
            self.valid[:, self.n : self.n + m] = True
        self.n += m

    def keep(self, keep: np.ndarray) -> None:
        """Drop the held rows where `keep` is False; re-compacts (one gather, none if nothing goes)."""
        held = self.toks() >= 0
        if not (held & ~keep).any():
            return
        self._set(*self._compacted(keep & held))

    def take(self, sel: np.ndarray) -> tuple[mx.array, mx.array, np.ndarray]:
        """The selected rows compacted per head: (keys, values, tokens `[H, m]`)."""
        return self._compacted(sel)

    def merge(self, keys: mx.array, values: mx.array, tokens: np.ndarray) -> None:
        """Add rows (per head: tokens `[H, m]`, or `[m]` for every head) not held yet, keeping token order."""
        tokens = np.asarray(tokens, _I64)
        if tokens.ndim == 1:
            tokens = np.tile(tokens[None, :], (self.n_heads, 1))
        if tokens.shape[1] == 0:
            return
        k0, v0 = self.kv()
        all_k = mx.concatenate([k0, keys], axis=ROW_AXIS)
        all_v = mx.concatenate([v0, values], axis=ROW_AXIS)
        all_t = np.concatenate([self.toks(), tokens], axis=1)
        idx, toks = _compact_index(all_t, np.ones(all_t.shape, bool))
        self._set(_take(all_k, idx), _take(all_v, idx), toks)

    def set(self, keys: mx.array, values: mx.array, tokens: np.ndarray) -> None:
        """Replace the used columns' K/V (same layout), e.g. after a quantization round trip."""
        self._set(keys, values, tokens)

    def copy(self) -> HeadRowStore:
        k, v = self.kv()
        return HeadRowStore(mx.array(k), mx.array(v), self.toks())

    # ------------------------------------------------------------ internals
    def _compacted(self, sel: np.ndarray) -> tuple[mx.array, mx.array, np.ndarray]:
        keys, values = self.kv()
        idx, toks = _compact_index(self.toks(), sel)
        return _take(keys, idx), _take(values, idx), toks

    def _set(self, keys: mx.array, values: mx.array, tokens: np.ndarray) -> None:
        self.keys: mx.array | None = keys
        self.values: mx.array | None = values
        self.tokens = np.asarray(tokens, _I64).copy()  # [H, capacity]; [:, :n] are used
        self.n = self.tokens.shape[1]
        self.valid = mx.array(self.tokens >= 0)
        self.has_holes = bool((self.tokens < 0).any())  # appends never add holes

    def _reserve(self, n_cols: int, step: int) -> None:
        assert self.keys is not None and self.values is not None
        cap = self.keys.shape[ROW_AXIS]
        if n_cols <= cap:
            return
        new_cap = -(-n_cols // step) * step
        b, h, _, dk = self.keys.shape
        grow = new_cap - self.n
        k, v = self.kv()
        self.keys = mx.concatenate([k, mx.zeros((b, h, grow, dk), k.dtype)], axis=ROW_AXIS)
        self.values = mx.concatenate([v, mx.zeros((b, h, grow, v.shape[3]), v.dtype)], axis=ROW_AXIS)
        tokens = np.full((h, new_cap), HOLE, _I64)
        tokens[:, : self.n] = self.toks()
        self.tokens = tokens
        self.valid = mx.array(tokens >= 0)
