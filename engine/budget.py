"""The memory budget: one cap on cache bytes for the whole engine.

Promises:
- `used()` is the bytes of every open session's cache plus the prefix store;
- `reserve(need, what)` makes room for `need` more bytes before anything is
  allocated: first by evicting unreferenced prefix blocks (the store's own
  policy), then, if that is not enough, by refusing `what` with a
  `MemoryBudgetError` that says how much is needed, how much is free and
  what to do — never an allocation crash later;
- work is counted in real tokens (`reserve_tokens`, text tokenized first by
  the caller) and real bytes (a restored or imported session counts its
  tensor bytes).

Knows nothing about sessions beyond their byte count.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kvscope.engine.errors import InvalidRequestError, MemoryBudgetError
from kvscope.engine.prefix_store import PrefixStore


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def format_bytes(n: float) -> str:
    """Bytes for a person: 512 B, 12.3 KB, 4.0 MB, 1.50 GB (never a misleading "0 MB")."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(n)} B"


class MemoryBudget:
    """`limit` bytes shared by the sessions (`sessions_bytes()`) and the prefix store (`store()`)."""

    def __init__(
        self, limit: int | None, sessions_bytes: Callable[[], int], store: Callable[[], PrefixStore | None]
    ) -> None:
        self.limit = physical_memory_bytes() // 2
        if limit is not None:
            self.set_limit(limit)
        self._sessions_bytes = sessions_bytes
        self._store = store

    def set_limit(self, limit: int) -> None:
        """A new cap (nothing is evicted now; the next `reserve` makes room under it)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise InvalidRequestError(f"the memory budget must be a positive number of bytes, got {limit!r}")
        self.limit = limit

    def used(self) -> int:
        store = self._store()
        return self._sessions_bytes() + (store.nbytes if store else 0)

    def free(self) -> int:
        return max(0, self.limit - self.used())

    def reserve(self, need: int, what: str) -> None:
        """Make room for `need` more bytes of cache, or refuse `what` before anything is allocated."""
        if self.used() + need <= self.limit:
            return
        store = self._store()
        if store is not None:
            store.evict_to_budget(max(0, self.limit - need - self._sessions_bytes()))
        used = self.used()
        if used + need > self.limit:
            raise MemoryBudgetError(
                f"{what} needs {format_bytes(need)} of cache but only "
                f"{format_bytes(max(0, self.limit - used))} of the "
                f"{format_bytes(self.limit)} budget is free: "
                "close or compress a session, or raise the budget (--memory-budget)"
            )

    def reserve_tokens(self, n_tokens: int, bytes_per_token: int, what: str) -> None:
        """Make room for `n_tokens` more rows in every layer, or refuse `what`."""
        self.reserve(n_tokens * bytes_per_token, what)
