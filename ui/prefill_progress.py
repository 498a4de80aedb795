"""PrefillProgress: the status bar's progress bar for one long prefill.

Promises:
- a turn that prefills more than `PROGRESS_MIN_TOKENS` tokens shows a bar
  named after its session, advanced by each `PrefillChunk` of that turn;
- the bar closes at 100 % when its turn ends in any way: the first sampled
  token (the prefill is over), the end of generation, an engine error in
  that session, the turn's call returning (`end`), or the session closing;
- one bar at a time: the newest long prefill takes it.

Knows nothing about views: session names come from `name_of`.
"""

from __future__ import annotations

from collections.abc import Callable

from kvscope.engine.events import EngineError, Event, GenerationFinished, PrefillChunk, TokenSampled, TurnStarted
from kvscope.ui.status import StatusBar

PROGRESS_MIN_TOKENS = 256  # prefills shorter than this finish before a bar could be read


class PrefillProgress:
    def __init__(self, status: StatusBar, name_of: Callable[[str], str]) -> None:
        self._status = status
        self._name_of = name_of
        self.session: str | None = None  # whose prefill the bar shows

    def on_event(self, ev: Event) -> None:
        sid = getattr(ev, "session", None)
        if isinstance(ev, TurnStarted) and ev.prefilled_tokens > PROGRESS_MIN_TOKENS:
            self.session = ev.session
            self._status.start_progress(
                f"{self._name_of(ev.session)}: prefill {ev.prefilled_tokens} tokens", ev.prefilled_tokens
            )
        elif sid is None or sid != self.session:
            return
        elif isinstance(ev, PrefillChunk):
            self._status.set_progress(ev.start + ev.n_tokens, ev.total)
        elif isinstance(ev, (TokenSampled, GenerationFinished, EngineError)):
            # TokenSampled: the last prompt token is fed with the first decode, so the prefill is over.
            self.end(sid)

    def end(self, sid: str) -> None:
        """The turn of `sid` ended (or the session closed): close its bar at 100 %."""
        if sid == self.session:
            self.session = None
            self._status.finish_progress()
