"""RowStore: a set of K/V rows kept in logical-token order, for `ScopeKVCache`.

A cache holds two of them: the attended buffer (visible rows, with spare
capacity so decode appends in place) and the aside store (masked rows).
Every operation keeps the token order and costs at most one gather; dropping
only a tail costs none. Layout `[batch, kv_heads, rows, head_dim]`, rows on
axis 2. Knows nothing about positions, masks or sessions.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from kvscope.engine.tensor_ops import concat_rows, take_rows

_I64 = np.int64
Rotate = Callable[[mx.array, int], mx.array]


def frozen(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


def gather(x: mx.array, idx: np.ndarray) -> mx.array:
    return take_rows(x, mx.array(np.asarray(idx, np.int32)))


class RowStore:
    """A set of K/V rows in token order (the attended buffer or the aside store)."""

    __slots__ = ("keys", "values", "tokens", "n")

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.tokens = np.zeros(0, _I64)  # capacity; [:n] are valid, ascending
        self.n = 0

    def kv(self) -> tuple[mx.array, mx.array]:
        assert self.keys is not None and self.values is not None
        return self.keys[..., : self.n, :], self.values[..., : self.n, :]

    def toks(self) -> np.ndarray:
        return self.tokens[: self.n]

    def token_list(self) -> np.ndarray:
        """Tokens of the rows, ascending (as `HeadRowStore.token_list`)."""
        return self.toks()

    def set(self, keys: mx.array | None, values: mx.array | None, tokens: np.ndarray) -> None:
        self.keys, self.values = keys, values
        self.tokens = np.asarray(tokens, _I64).copy()
        self.n = len(self.tokens)

    def clear(self) -> None:
        self.set(None, None, np.zeros(0, _I64))

    def keep(self, keep: np.ndarray) -> None:
        """Drop the rows where `keep` is False (one gather; none if only a tail goes)."""
        k = int(keep.sum())
        if k == self.n:
            return
        if k == 0:
            self.n = 0
            return
        if keep[:k].all():  # only a tail goes: the next append overwrites it
            self.n = k
            return
        keys, values = self.kv()
        idx = np.nonzero(keep)[0]
        self.set(gather(keys, idx), gather(values, idx), self.toks()[idx])

    def take(self, sel: np.ndarray) -> tuple[mx.array, mx.array, np.ndarray]:
        keys, values = self.kv()
        idx = np.nonzero(sel)[0]
        return gather(keys, idx), gather(values, idx), self.toks()[idx]

    def merge(self, keys: mx.array, values: mx.array, tokens: np.ndarray) -> None:
        """Add rows (tokens not present yet), keeping token order: one gather."""
        if len(tokens) == 0:
            return
        if self.n == 0:
            self.set(keys, values, tokens)
            return
        k0, v0 = self.kv()
        all_tok = np.concatenate([self.toks(), tokens])
        order = np.argsort(all_tok, kind="stable")
        if (order == np.arange(len(order))).all():  # appended at the end
            self.set(concat_rows([k0, keys]), concat_rows([v0, values]), all_tok)
        else:
            self.set(gather(concat_rows([k0, keys]), order), gather(concat_rows([v0, values]), order), all_tok[order])

    def shift_from(self, token: int, d_tokens: int, d_pos: int, rotate: Rotate | None) -> None:
        r0 = int(np.searchsorted(self.toks(), token, side="left"))
        if r0 >= self.n:
            return
        self.tokens[r0 : self.n] += d_tokens
        if d_pos:
            assert self.keys is not None and rotate is not None, "moving positions needs a rotate function"
            self.keys[..., r0 : self.n, :] = rotate(self.keys[..., r0 : self.n, :], d_pos)

    def copy(self) -> RowStore:
        other = RowStore()
        if self.n and self.keys is not None:
            k, v = self.kv()
            other.set(mx.array(k), mx.array(v), self.toks())
        return other

    def reserve(self, n_rows: int, keys: mx.array, values: mx.array, step: int) -> None:
        """Room for `n_rows` rows shaped like `keys`/`values`, growing capacity in steps of `step`."""
        cap = 0 if self.keys is None else self.keys.shape[2]
        if n_rows <= cap:
            return
        new_cap = -(-n_rows // step) * step
        b, h, _, dk = keys.shape
        spare_k = mx.zeros((b, h, new_cap - self.n, dk), keys.dtype)
        spare_v = mx.zeros((b, h, new_cap - self.n, values.shape[3]), values.dtype)
        if self.keys is None or self.n == 0:
            self.keys, self.values = spare_k, spare_v
        else:
            k, v = self.kv()
            self.keys, self.values = concat_rows([k, spare_k]), concat_rows([v, spare_v])
        tokens = np.zeros(new_cap, _I64)
        tokens[: self.n] = self.toks()
        self.tokens = tokens
