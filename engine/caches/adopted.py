"""mlx-lm's own cache classes, adopted: the model's cache with kvscope's bookkeeping.

`adopt(cache)` turns a cache from the model's `make_cache()` (a
`RotatingKVCache`, `ArraysCache`/`MambaCache`, `ChunkedKVCache`,
`QuantizedKVCache`, `CacheList`, ...) into an instance of a subclass of its
own class that also carries what the session, generation loop and window
read from every layer (`n_tokens`, `offset`, `token_positions`,
`visible_tokens`, `n_rows`, `row_token`, `copy`, `trim`, ...); edits that
need rows refuse with `UnsupportedModelError`.

Promises:
- the model sees its own cache class (isinstance checks and every method of
  mlx-lm's protocol keep working), so greedy tokens equal plain mlx-lm;
- `begin_feed(n)` is called before each forward pass that feeds `n` tokens;
  a recurrent state is checkpointed there (array references: mlx-lm
  replaces state arrays, it never writes into them), so `trim` back to a
  checkpoint is exact;
- `trim` that cannot be exact raises `UnsupportedModelError`, never
  silently keeps a state that absorbed dropped tokens;
- rows: a KV kind reports the tokens it still holds (a sliding window holds
  the last `max_size`); a recurrent state holds no rows (`n_rows == 0`) and
  reports its bytes and the last token it absorbed.

Knows nothing about sessions, blocks or the window.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, RotatingKVCache

from kvscope.engine.errors import UnsupportedModelError

_I64 = np.int64
_CHECKPOINTS = 8  # recurrent states kept for trim (the speculative decode step needs 1)
_PINNED = 4  # states at the end of the last prefills, for prefix reuse across sessions


def _arrays(tree: Any) -> list[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    return []


class AdoptedCache:
    """Mixin over an mlx-lm cache class; see the module docstring."""

    kind = "other"
    nbytes: int  # mlx-lm's cache classes under this mixin provide it
    next_token: int
    _fresh: Any
    _checkpoints: deque[tuple[int, Any]]

    def _init_scope(self) -> None:
        self.next_token = 0
        self._checkpoints = deque(maxlen=_CHECKPOINTS)
        self.pinned: dict[int, Any] = {}  # recurrent state at the end of recent prefills (prefix reuse)
        self._last_feed = 0

    # ------------------------------------------------------------ feeding
    def begin_feed(self, n: int) -> None:
        """The next forward pass feeds `n` tokens (called by the generation loop)."""
        if self.kind == "recurrent":
            refs = self._state_refs()
            self._checkpoints.append((self.next_token, refs))
            if self._last_feed > 1:  # the state right after a prefill: what a new session can reuse
                self.pinned[self.next_token] = refs
                for old in sorted(self.pinned)[:-_PINNED]:
                    del self.pinned[old]
            self._last_feed = n
        elif not self._natively_trimmable() or (n > 1 and self.kind in ("sliding", "chunked")):
            # mlx-lm cannot take tokens back from this cache (or a chunk may push rows out of
            # a window): keep a full copy, the last two only (it costs the cache's size).
            if len(self._checkpoints) >= 2:
                self._checkpoints.popleft()
            self._checkpoints.append((self.next_token, _copied(self)))
        self.next_token += n

    def _natively_trimmable(self) -> bool:
        try:
            return bool(super().is_trimmable())  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a custom cache may not implement it
            return False

    def _state_refs(self) -> Any:
        return list(self.cache) if isinstance(self, ArraysCache) else None

    # ------------------------------------------------------------ what the session reads
    @property
    def n_tokens(self) -> int:
        """Logical tokens this layer has absorbed."""
        return self.next_token

    @property
    def last_token_absorbed(self) -> int:
        """Logical index of the last token this layer has seen (-1: none)."""
        return self.next_token - 1

    def _held(self) -> int:
        if self.kind in ("recurrent", "other"):
            return 0
        size = int(self.size()) if hasattr(self, "size") else 0  # type: ignore[attr-defined]
        return min(size, self.next_token)

    @property
    def token_positions(self) -> np.ndarray:
        """Positions are token indices here: nothing that moves positions runs on these kinds."""
        return np.arange(self.next_token, dtype=_I64)

    @property
    def n_rows(self) -> int:
        return self._held()

    @property
    def row_token(self) -> np.ndarray:
        n = self._held()
        return np.arange(self.next_token - n, self.next_token, dtype=_I64)

    @property
    def row_position(self) -> np.ndarray:
        return self.row_token

    @property
    def row_visible(self) -> np.ndarray:
        return np.ones(self._held(), bool)

    @property
    def visible_tokens(self) -> np.ndarray:
        return self.row_token

    @property
    def masked_tokens(self) -> np.ndarray:
        return np.zeros(0, _I64)

    @property
    def n_visible(self) -> int:
        return self._held()

    @property
    def is_plain(self) -> bool:
        return False

    def plain_prefix_len(self) -> int:
        """0: these rows cannot be shared or re-used as plain attention rows."""
        return 0

    # ------------------------------------------------------------ edits: refused (the support table says so first)
    def _refuse(self, what: str) -> Any:
        raise UnsupportedModelError(f"{what} is not possible on a {self.kind} cache ({type(self).__name__})")

    def set_visible(self, token_lo: int, token_hi: int, visible: bool) -> int:
        """Recurrent states have no rows to hide: nothing changes (the caller labels it approximate)."""
        if self.kind == "recurrent":
            return 0
        return int(self._refuse("masking rows"))

    def evict_tokens(self, tokens: np.ndarray) -> int:
        return 0 if len(tokens) == 0 else int(self._refuse("evicting rows"))

    def delete_tokens(self, lo: int, hi: int, d_pos: int = 0, rotate: Any = None) -> None:
        self._refuse("deleting tokens")

    def insert_tokens(self, at: int, *args: Any, **kwargs: Any) -> None:
        self._refuse("inserting tokens")

    def rows_of(self, lo: int, hi: int) -> Any:
        return self._refuse("reading rows")

    def overwrite_rows(self, lo: int, keys: mx.array, values: mx.array) -> int:
        return int(self._refuse("overwriting rows"))

    def map_rows(self, fn: Any) -> None:
        self._refuse("rewriting rows")

    def advance_to(self, position: int) -> None:
        """A gap in positions: nothing to do for a state without positions; refused for other kinds."""
        if self.kind != "recurrent" and position != self.offset:  # type: ignore[attr-defined]
            self._refuse("leaving a gap in positions")

    def truncated(self, n_tokens: int) -> AdoptedCache:
        other = self.copy()
        other.trim(other.n_tokens - n_tokens)
        return other

    def trim(self, n: int) -> int:
        """Drop the last `n` tokens: exact (native trim or a checkpoint) or refused."""
        n = min(n, self.next_token)
        if n <= 0:
            return 0
        target = self.next_token - n
        if target in self.pinned and not any(tok == target for tok, _ in self._checkpoints):
            self._checkpoints.append((target, self.pinned[target]))
        for tok, saved in reversed(self._checkpoints):
            if tok == target:
                self._restore(saved)
                while self._checkpoints and self._checkpoints[-1][0] >= target:
                    self._checkpoints.pop()
                self.next_token = target
                return n
        if self._natively_trimmable() and (self.kind != "sliding" or self._sliding_trim_exact(n)):
            super().trim(n)  # type: ignore[misc]
            self.next_token = target
            return n
        if target == 0:  # back to no tokens: the empty cache the model made
            for name, value in vars(_copied(self._fresh)).items():
                setattr(self, name, value)
            self._init_scope()
            self._fresh = _copied(self._fresh)
            return n
        raise UnsupportedModelError(
            f"cannot take back the last {n} tokens of a {self.kind} cache ({type(self).__name__}): "
            "its state has absorbed them and no checkpoint is kept at that token"
        )

    def _sliding_trim_exact(self, n: int) -> bool:
        # One in-place row after the window filled: the slot it overwrote is
        # out of every later query's window, so dropping the row is exact.
        return bool(self.offset < self.max_size or n == 1)  # type: ignore[attr-defined]

    def _restore(self, saved: Any) -> None:
        if self.kind == "recurrent":
            self.cache = list(saved)
            return
        keep = (self._checkpoints, self.pinned, self._fresh, self.next_token)
        for name, value in vars(_copied(saved)).items():
            setattr(self, name, value)
        self._checkpoints, self.pinned, self._fresh, self.next_token = keep

    def copy(self) -> AdoptedCache:
        if isinstance(self, ArraysCache):
            other = copy.copy(self)
            other.cache = list(self.cache)  # arrays are replaced, never written into
        else:
            other = _copied(self)
        other._checkpoints = deque(self._checkpoints, maxlen=_CHECKPOINTS)
        other.pinned = dict(self.pinned)
        return other

    def restore_state(self, arrays: list[Any], n_tokens: int) -> None:
        """Take a stored recurrent state as the state after `n_tokens` tokens (prefix reuse)."""
        if self.kind != "recurrent":
            self._refuse("restoring a stored state")
        self.cache = list(arrays)
        self.next_token = n_tokens
        self._checkpoints.clear()
        self.pinned = {n_tokens: list(arrays)}
        self._last_feed = 0


def _copied(obj: Any) -> Any:
    """A copy of an mlx-lm cache whose arrays (which update_and_fetch writes into) are copies too."""

    def dup(v: Any) -> Any:
        if isinstance(v, mx.array):
            return mx.array(v)
        if isinstance(v, (list, tuple)):
            return type(v)(dup(x) for x in v)
        if hasattr(v, "__dict__") and type(v).__module__.startswith("mlx_lm"):
            return _copied(v)  # a sub-cache of a CacheList
        return v

    other = copy.copy(obj)
    for name, value in vars(obj).items():
        if name != "_checkpoints":
            setattr(other, name, dup(value))
    return other


class _KeysExtra:
    """`keys` for caches without one (recurrent states, cache lists), so callers can `mx.eval` it."""

    @property
    def keys(self) -> list[mx.array]:
        return _arrays(self.state)  # type: ignore[attr-defined]


class _OffsetExtra:
    """`offset` for caches without one (recurrent states): the tokens absorbed."""

    @property
    def offset(self) -> int:
        return self.next_token  # type: ignore[attr-defined, no-any-return]

    @offset.setter
    def offset(self, v: int) -> None:
        self.next_token = v  # type: ignore[attr-defined]


_SUBCLASSES: dict[tuple[type, bool, bool], type] = {}


def kind_of(cache: Any) -> str:
    """The kvscope cache kind of an mlx-lm cache instance."""
    name = type(cache).__name__
    if isinstance(cache, ArraysCache):
        return "recurrent"
    if isinstance(cache, RotatingKVCache):
        return "sliding"
    if name == "ChunkedKVCache":
        return "chunked"
    if name == "QuantizedKVCache":
        return "quantized"
    if name in ("KVCache", "ScopeKVCache"):
        return "attention"
    return "other"


def adopt(cache: Any) -> AdoptedCache:
    """`cache` (from the model's make_cache) as an instance of its adopted subclass."""
    base = type(cache)
    # Only what the instance lacks: a class property would shadow the cache's own attribute.
    need_keys, need_offset = not hasattr(cache, "keys"), not hasattr(cache, "offset")
    sub = _SUBCLASSES.get((base, need_keys, need_offset))
    kind = kind_of(cache)
    if sub is None:
        extras = (_KeysExtra,) * need_keys + (_OffsetExtra,) * need_offset
        # The base's own name: mlx-lm's save_prompt_cache records class names and
        # load_prompt_cache rebuilds plain mlx-lm caches from them.
        sub = type(base.__name__, (*extras, AdoptedCache, base), {"kind": kind, "__module__": __name__})
        _SUBCLASSES[(base, need_keys, need_offset)] = sub
    fresh = _copied(cache)  # the empty cache: trimming back to no tokens restores it
    cache.__class__ = sub
    assert isinstance(cache, AdoptedCache)
    cache._init_scope()
    cache._fresh = fresh
    return cache


def note_feed(caches: list[Any], n: int) -> None:
    """Tell adopted caches that the next forward pass feeds `n` tokens."""
    for c in caches:
        if isinstance(c, AdoptedCache):
            c.begin_feed(n)
