"""What the Engine's operation classes share: one typed bundle of its parts.

    Engine ─┬─ SessionRegistry   who is open, ids, cancel flags   (registry)
            ├─ MemoryBudget      one cap on cache bytes           (budget)
            ├─ SavedSessions     save / reopen / export / import  (saved_sessions)
            ├─ Transactions      all-or-nothing edits, error guard (transaction)
            ├─ Editor            mask, erratum, delete, compact, compress, undo (editing)
            └─ Splicer           segments between sessions and files (splicing)

`Editor` and `Splicer` receive this bundle instead of the Engine, so they
reach only what their job needs and the types say what that is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvscope.engine.budget import MemoryBudget
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import EventBus
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.registry import SessionRegistry
from kvscope.engine.transaction import Transactions


@dataclass(frozen=True)
class EngineParts:
    bus: EventBus
    registry: SessionRegistry
    budget: MemoryBudget
    tx: Transactions
    model: Callable[[], LoadedModel]  # the loaded model, or InvalidRequestError
    prefill_chunk: int

    def reserve_tokens(self, n_tokens: int, what: str) -> None:
        """Make room for `n_tokens` more rows of the loaded model, or refuse `what`."""
        self.budget.reserve_tokens(n_tokens, self.model().bytes_per_token, what)


class LoadedState:
    """The loaded model and its prefix store: what the parts read, without holding the Engine."""

    def __init__(self) -> None:
        self.lm: LoadedModel | None = None
        self.store: PrefixStore | None = None

    def model(self) -> LoadedModel:
        if self.lm is None:
            raise InvalidRequestError("no model loaded: call Engine.load() first")
        return self.lm

    def prefix_store(self) -> PrefixStore:
        self.model()  # "no model loaded" before anything else
        assert self.store is not None
        return self.store
