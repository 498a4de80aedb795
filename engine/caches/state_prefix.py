"""Prefix reuse for models with a recurrent state: state checkpoints plus the attention rows up to them.

The block prefix store holds attention rows only; a recurrent layer cannot
be rebuilt from rows, and its state after token k exists only where the
state was checkpointed. Adopted recurrent caches keep the state at the end
of every prefill (`AdoptedCache.pinned`), so after a turn the store keeps,
for the prompt prefix up to such a point k:

    tokens[:k]   -> recurrent state of every state layer after token k-1
                    (array references: mlx-lm replaces state arrays, never
                    writes into them) + every attention cache's rows [0, k)

A new session whose prompt starts with those k tokens copies them in and
prefills only the rest; its logits equal a recompute (tests/engine/
test_architectures.py). The store keeps the last `max_entries` prefixes of
the loaded model. Knows nothing about chat templates or events.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from kvscope.engine.blocks import TokenState
from kvscope.engine.caches.adopted import AdoptedCache
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.session import Session

_KEY = "state_prefixes"


@dataclass
class _Entry:
    states: dict[int, list[Any]]  # cache index -> recurrent state arrays after the prefix
    rows: dict[int, tuple[mx.array, mx.array]]  # cache index -> attention rows of the prefix


class StatePrefixStore:
    """Recent prompt prefixes of one loaded model with their recurrent states."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def usable(session: Session) -> bool:
        """Only recurrent states and kvscope row caches (nothing else) can be rebuilt from an entry."""
        return all(
            isinstance(c, ScopeKVCache) or (isinstance(c, AdoptedCache) and c.kind == "recurrent")
            for c in session.caches
        ) and any(isinstance(c, AdoptedCache) for c in session.caches)

    def share(self, session: Session) -> int:
        """Store the session's checkpointed prefixes (unedited ones only). Returns how many were added."""
        if session.edited or not self.usable(session):
            return 0
        rows = [c for c in session.caches if isinstance(c, ScopeKVCache)]
        plain = min([session.n_tokens] + [c.plain_prefix_len() for c in rows])
        states: dict[int, AdoptedCache] = {
            i: cast(AdoptedCache, c) for i, c in enumerate(session.caches) if isinstance(c, AdoptedCache)
        }
        common = set.intersection(*(set(c.pinned) for c in states.values()))
        added = 0
        for k in sorted(t for t in common if 0 < t <= plain):
            key = tuple(session.tokens[:k])
            if key in self._entries:
                self._entries.move_to_end(key)
                continue
            entry = _Entry(
                {i: list(c.pinned[k]) for i, c in states.items()},
                {i: c.rows_of(0, k)[:2] for i, c in enumerate(session.caches) if isinstance(c, ScopeKVCache)},
            )
            mx.eval([a for s in entry.states.values() for a in s if a is not None], list(entry.rows.values()))
            self._entries[key] = entry
            added += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return added

    def reuse(self, session: Session, prompt: list[int]) -> int:
        """Copy the longest stored prefix of `prompt[:-1]` into an empty session. Returns its length."""
        if session.n_tokens or not self.usable(session):
            return 0
        best: tuple[int, ...] | None = None
        for key in self._entries:
            k = len(key)
            if k < len(prompt) and (best is None or k > len(best)) and tuple(prompt[:k]) == key:
                best = key
        if best is None:
            return 0
        entry = self._entries[best]
        self._entries.move_to_end(best)
        k = len(best)
        session.append_tokens(list(best), TokenState.SHARED)
        for i, c in enumerate(session.caches):
            if isinstance(c, AdoptedCache):
                c.restore_state(entry.states[i], k)
            else:
                keys, values = entry.rows[i]
                c.update_and_fetch(mx.array(keys), mx.array(values))
        return k


def state_store(lm: LoadedModel) -> StatePrefixStore:
    """The loaded model's store (it goes when another model is loaded)."""
    store = lm.extra.get(_KEY)
    if not isinstance(store, StatePrefixStore):
        store = lm.extra[_KEY] = StatePrefixStore()
    return store


def share_state_prefix(session: Session, lm: LoadedModel) -> int:
    return state_store(lm).share(session)


def reuse_state_prefix(session: Session, lm: LoadedModel, prompt: list[int]) -> int:
    return state_store(lm).reuse(session, prompt)
