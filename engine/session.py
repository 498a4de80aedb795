"""A session: one chat, its token ids and one kvscope cache per layer.

Promises:
- `tokens[i]` is the id of logical token i; each layer's cache rows point at
  logical tokens, so layers may keep different rows;
- `origin[i]` says where token i's rows came from (computed, shared prefix,
  spliced, erratum);
- positions, rows and masks are owned by the per-layer caches alone:
  `positions` and `token_state()` derive from them, never stored twice.

Knows nothing about chat templates, generation or events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvscope.engine.blocks import TokenState
from kvscope.engine.errors import BusyError
from kvscope.engine.events import SessionId
from kvscope.engine.kv_cache import ScopeKVCache


@dataclass
class TurnStats:
    """Numbers a person compares between turns and sessions."""

    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    ttft_ms: float = 0.0
    decode_tps: float = 0.0
    n_generated: int = 0
    finish_reason: str = ""
    token_ms: list[float] = field(default_factory=list)
    cache_bytes: int = 0


@dataclass
class Session:
    id: SessionId
    name: str
    caches: list[ScopeKVCache]
    messages: list[dict[str, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)
    transcript_text: str = ""  # the chat-template text the plain cache corresponds to
    turns: list[TurnStats] = field(default_factory=list)
    operations: list[dict[str, Any]] = field(default_factory=list)
    generating: bool = False
    edited: bool = False  # any surgery done: prefix-store sharing stops here
    last_decision: Any = None
    auto_compress: Any = None  # compression.AutoCompress: compress without being asked
    undo_stack: list[tuple[str, Session]] = field(default_factory=list)

    _STATE = ("messages", "tokens", "origin", "transcript_text", "edited", "last_decision")

    def clone(self, sid: SessionId | None = None, name: str | None = None) -> Session:
        """A deep copy of the cache and bookkeeping (no undo history, no turns)."""
        other = Session(sid or self.id, name or self.name, [c.copy() for c in self.caches])
        for attr in self._STATE:
            v = getattr(self, attr)
            setattr(
                other, attr, [dict(m) for m in v] if attr == "messages" else (list(v) if isinstance(v, list) else v)
            )
        return other

    def restore(self, saved: Session) -> None:
        """Put back the cache and bookkeeping of a `clone`."""
        self.caches = [c.copy() for c in saved.caches]
        for attr in self._STATE:
            v = getattr(saved, attr)
            setattr(self, attr, [dict(m) for m in v] if attr == "messages" else (list(v) if isinstance(v, list) else v))

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def positions(self) -> list[int]:
        """RoPE position of every logical token, read from layer 0's cache (every layer agrees)."""
        return self.caches[0].token_positions.tolist() if self.caches else list(range(self.n_tokens))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def require_idle(self, what: str) -> None:
        """Refuse `what` while the session generates (edits wait for the answer)."""
        if self.generating:
            raise BusyError(f"session {self.name} is generating: wait for the answer or press stop before {what}")

    def push_undo(self, label: str, saved: Session, depth: int = 8) -> None:
        """Remember the state before an edit; the oldest of `depth` entries is dropped."""
        self.undo_stack = (self.undo_stack + [(label, saved)])[-depth:]

    def append_tokens(self, ids: list[int], state: TokenState = TokenState.COMPUTED) -> None:
        """Record the ids of tokens the caches receive (their positions are the caches' to keep)."""
        self.tokens.extend(ids)
        self.origin.extend([int(state)] * len(ids))

    def trim_to(self, n_tokens: int) -> None:
        """Drop logical tokens >= n_tokens from the caches and the bookkeeping."""
        for c in self.caches:  # a cache may lag the bookkeeping mid-prefill
            c.trim(c.n_tokens - n_tokens)
        del self.tokens[n_tokens:]
        del self.origin[n_tokens:]

    def plain_prefix_len(self) -> int:
        """Tokens from the start whose rows are unedited in every layer."""
        if self.edited:
            return 0
        return min([self.n_tokens] + [c.plain_prefix_len() for c in self.caches])

    def token_state(self) -> np.ndarray:
        """`[layers, tokens]` uint8 TokenState of every logical token in every layer."""
        n = self.n_tokens
        origin = np.asarray(self.origin, np.uint8)
        out = np.broadcast_to(origin, (len(self.caches), n)).copy()
        for i, c in enumerate(self.caches):
            if getattr(c, "kind", "") == "recurrent":
                continue  # a state has no rows: it absorbed every token, masked or not (shown as their origin)
            rows = c.row_token
            present = np.zeros(n, bool)
            present[rows[rows < n]] = True  # rows fed a moment before the bookkeeping catches up
            hidden = c.masked_tokens
            out[i, ~present] = TokenState.EVICTED
            out[i, hidden[hidden < n]] = TokenState.MASKED
        return out
