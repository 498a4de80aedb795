"""The engine's sessions: who is open, their ids, their cancel flags.

Promises:
- ids are `s1`, `s2`, ... and never one a saved session already uses on
  disk (`taken(sid)` asks the session files); a restored or imported
  session moves the counter past its own number;
- adding a session emits `SessionCreated`, removing one emits
  `SessionClosed` and releases its prefix-store references;
- `cancel(sid)` is safe from any thread (it only sets an `Event`); every
  other method runs on the engine thread.

Knows nothing about models, files or the memory budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import EventBus, SessionClosed, SessionCreated, SessionId
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.session import Session


class SessionRegistry:
    def __init__(self, bus: EventBus, taken: Callable[[SessionId], bool]) -> None:
        self._bus = bus
        self._taken = taken
        self._sessions: dict[SessionId, Session] = {}
        self._cancel: dict[SessionId, threading.Event] = {}
        self._next_number = 1

    def new_id(self) -> SessionId:
        """A fresh id, never one a saved session (of any model) already uses on disk."""
        while True:
            sid = SessionId(f"s{self._next_number}")
            self._next_number += 1
            if sid not in self._sessions and not self._taken(sid):
                return sid

    def add(self, s: Session) -> None:
        """Make `s` one of the engine's sessions (new, duplicated, restored or imported)."""
        self._sessions[s.id] = s
        self._cancel[s.id] = threading.Event()
        n = s.id[1:]
        if n.isdigit():
            self._next_number = max(self._next_number, int(n) + 1)
        self._bus.emit(SessionCreated(self._bus.now_ms(), s.id, s.name))

    def remove(self, sid: SessionId, store: PrefixStore | None) -> Session:
        s = self.get(sid)
        del self._sessions[sid]
        self._cancel.pop(sid, None)
        if store is not None:
            store.release(sid)
        self._bus.emit(SessionClosed(self._bus.now_ms(), sid))
        return s

    def get(self, sid: SessionId) -> Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise InvalidRequestError(f"no session {sid!r}") from None

    def ids(self) -> list[SessionId]:
        return list(self._sessions)

    def names(self) -> dict[str, str]:
        return {sid: s.name for sid, s in self._sessions.items()}

    def nbytes(self) -> int:
        """Bytes of every open session's cache."""
        return sum(s.nbytes for s in self._sessions.values())

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    # ------------------------------------------------------------ cancelling
    def arm(self, sid: SessionId) -> Callable[[], bool]:
        """Clear the session's cancel flag; returns the poll its work checks between steps."""
        flag = self._cancel[sid]
        flag.clear()
        return flag.is_set

    def cancel(self, sid: SessionId) -> None:
        """Stop the session's work at its next step (any thread; unknown ids are ignored)."""
        flag = self._cancel.get(sid)
        if flag is not None:
            flag.set()
