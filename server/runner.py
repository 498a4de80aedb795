"""The bridge from the ASGI event loop to the one engine thread.

`Runner.start` turns a parsed request into a `Job`: a record in the
`RequestLog`, a function queued on the `EngineWorker` (FIFO: requests are
served one at a time in arrival order, each on its own session), and an
asyncio queue the engine thread fills with answer pieces through
`loop.call_soon_threadsafe`. The event loop never touches mx.

On the engine thread a job tokenizes, checks the context limit, retires
least-recently-used unpinned request sessions while the session budget is
exceeded, opens a session named after the client and request number, runs
`prompt_turn.run_prompt` (which reuses the prefix store) and explains where
the prompt's prefix broke. `Job.cancel()` (a client that went away) is
seen between prefill chunks and decode steps.

Answer pieces reach the event loop at most once per `stream_interval_s`
(the first piece at once): on a 2-core machine every wake-up of the loop,
and every server-sent event the client parses, is CPU the decode does not
get (`bench/serve.py` measures both), so a stream carries a few tokens per
event instead of one, as vLLM's `--stream-interval` does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kvscope.engine.engine import Engine
from kvscope.engine.errors import CancelledError
from kvscope.engine.events import Event, SessionId, TokenSampled
from kvscope.engine.generation import SamplingParams
from kvscope.engine.prompt_turn import BUDGET_ANSWER_TOKENS, longest_cached_prefix, run_prompt
from kvscope.engine.turns import TurnResult
from kvscope.engine.worker import EngineWorker
from kvscope.server.explain import EarlierPrompt, explain
from kvscope.server.prompting import Prompt, build_prompt
from kvscope.server.protocol import ParsedRequest
from kvscope.server.records import RequestLog, RequestRecord

STARTED = object()  # queued when the request passed its checks and its session exists
DONE = object()  # queued after the last piece


@dataclass(frozen=True)
class Outcome:
    result: TurnResult
    prompt: Prompt
    record: RequestRecord


class Job:
    """One request in flight: its record, answer pieces and cancellation."""

    def __init__(self, record: RequestRecord, loop: asyncio.AbstractEventLoop, stream_interval_s: float = 0.0) -> None:
        self.record = record
        self.pieces: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.future: Future[Outcome] | None = None
        self._loop = loop
        self._lock = threading.Lock()
        self._buffer: list[Any] = []  # pushed, not yet on the loop's queue
        self._wake_pending = False
        self._interval = stream_interval_s
        self._last_wake = -float("inf")
        self._text_seen = False

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, item: Any) -> None:
        """From any thread. Wakes the event loop at most once until it has taken what is waiting,
        and for text at most once per stream interval (the first text and the markers at once):
        a piece held back goes out with the next push, at the latest with DONE."""
        with self._lock:
            self._buffer.append(item)
            is_text = isinstance(item, str)
            first_text = is_text and not self._text_seen
            self._text_seen = self._text_seen or is_text
            if self._wake_pending:
                return
            now = time.monotonic()
            if is_text and not first_text and now - self._last_wake < self._interval:
                return
            self._wake_pending = True
            self._last_wake = now
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancel()

    def _flush(self) -> None:
        with self._lock:
            items, self._buffer, self._wake_pending = self._buffer, [], False
        for item in items:
            self.pieces.put_nowait(item)

    async def outcome(self) -> Outcome:
        assert self.future is not None
        return await asyncio.wrap_future(self.future)


class Runner:
    """Runs requests on the engine worker and keeps their sessions under a budget."""

    def __init__(
        self,
        worker: EngineWorker,
        log: RequestLog,
        session_budget_bytes: int | None = None,
        history: int = 256,
        stream_interval_s: float = 0.0,
    ) -> None:
        self.worker = worker
        self.stream_interval_s = stream_interval_s
        self.log = log
        self.session_budget_bytes = session_budget_bytes
        self._earlier: deque[EarlierPrompt] = deque(maxlen=history)

    def start(
        self, req: ParsedRequest, client: str, body: dict[str, Any] | None = None, step: int | None = None
    ) -> Job:
        """Queue `req` from `client` (its agent name) at workflow `step` (None: a step of its own)."""
        rec = self.log.new(client, req.endpoint, req.stream, body, step)
        job = Job(rec, asyncio.get_running_loop(), self.stream_interval_s)
        job.future = self.worker.submit(lambda eng: self._run(eng, req, job))
        job.future.add_done_callback(lambda _f: job.push(DONE))
        return job

    # ------------------------------------------------------------ engine thread
    def _run(self, eng: Engine, req: ParsedRequest, job: Job) -> Outcome:
        rec = job.record
        try:
            return self._serve(eng, req, job)
        except CancelledError:
            self.log.update(rec, status="cancelled", finish_reason="cancelled")
            raise
        except BaseException as exc:
            self.log.update(rec, status="error", error=str(exc) or type(exc).__name__)
            raise

    def _serve(self, eng: Engine, req: ParsedRequest, job: Job) -> Outcome:
        rec = job.record
        lm = eng.model
        prompt = build_prompt(lm, req)
        if job.cancelled.is_set():
            raise CancelledError("the client went away before its request started")
        cached, sharing = longest_cached_prefix(eng, prompt.ids)
        self._touch(sharing)
        answer = min(prompt.max_tokens, BUDGET_ANSWER_TOKENS)  # as run_prompt checks the memory budget
        self._retire(eng, (len(prompt.ids) - cached + answer) * lm.bytes_per_token)
        sid = eng.new_session(name=rec.name)
        eng.note_request(sid, rec.client, rec.workflow_step)  # for the workflow-aware prefix-store policy
        self.log.update(rec, session=sid, status="running", prompt_tokens=len(prompt.ids))
        job.push(STARTED)
        s = req.sampling
        params = SamplingParams(s.temperature, s.top_p, s.seed, prompt.max_tokens, s.stop)

        def on_event(ev: Event) -> None:
            if isinstance(ev, TokenSampled) and ev.session == sid and ev.text:
                job.push(ev.text)

        unsubscribe = eng.subscribe(on_event)
        try:
            result = run_prompt(eng, sid, prompt.ids, params, prompt.messages, prompt.text, job.cancelled.is_set)
        except BaseException:
            if sid in eng.sessions():
                eng.close_session(sid)
            self.log.update(rec, session=None)
            raise
        finally:
            unsubscribe()
        self._finish(eng, req, prompt, result, rec)
        return Outcome(result, prompt, rec)

    def _finish(self, eng: Engine, req: ParsedRequest, prompt: Prompt, result: TurnResult, rec: RequestRecord) -> None:
        st = result.stats
        prefill_tps = st.prefilled_tokens / (st.ttft_ms / 1000) if st.ttft_ms > 0 else 0.0
        fed = tuple(eng.session(SessionId(rec.session or "")).tokens) if rec.session in eng.sessions() else ()
        tok = eng.model.tokenizer
        why = explain(
            prompt.ids,
            prompt.messages if req.endpoint == "chat" else [],
            req.tools,
            st.cached_tokens,
            eng.config.block_size,
            list(self._earlier),
            lambda ids: tok.decode(list(ids)),
            1000.0 / prefill_tps if prefill_tps else 0.0,
        )
        self._earlier.append(
            EarlierPrompt(
                rec.id,
                fed or tuple(prompt.ids),
                tuple(prompt.messages) if req.endpoint == "chat" else (),
                req.tools,
                result.text,
            )
        )
        self.log.update(
            rec,
            status="cancelled" if result.finish_reason == "cancelled" else "done",
            cached_tokens=st.cached_tokens,
            prefilled_tokens=st.prefilled_tokens,
            completion_tokens=st.n_generated,
            ttft_ms=st.ttft_ms,
            decode_tps=st.decode_tps,
            prefill_tps=prefill_tps,
            finish_reason=result.finish_reason,
            prefix_break=why.to_dict(),
            last_used=time.monotonic(),
        )

    def _touch(self, sharing: tuple[SessionId, ...]) -> None:
        """Sessions whose blocks serve this request count as just used (LRU)."""
        now = time.monotonic()
        for rec in self.log.all():
            if rec.session in sharing:
                rec.last_used = now

    def _retire(self, eng: Engine, need_bytes: int) -> None:
        """Close least-recently-used unpinned request sessions until the request fits."""
        live = set(eng.sessions())
        while True:
            mine = [r for r in self.log.all() if r.session in live and r.status != "running"]
            held = sum(eng.session(SessionId(r.session or "")).nbytes for r in mine)
            over_budget = self.session_budget_bytes is not None and held + need_bytes > self.session_budget_bytes
            over_memory = eng.cache_bytes() + need_bytes > eng.memory_budget_bytes
            victims = sorted((r for r in mine if not r.pinned), key=lambda r: r.last_used)
            if not (over_budget or over_memory) or not victims:
                return
            v = victims[0]
            sid = SessionId(v.session or "")
            eng.close_session(sid)
            live.discard(sid)
            self.log.update(v, retired=True)
