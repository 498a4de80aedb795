"""AttachClient: a thread that follows one engine's KV events into a RemoteCache.

Promises:
- the receive thread is the only one that touches the sockets; readers
  (the CLI's summary, the window's grid builder) get consistent views
  through `read(fn)` under a lock held only for the length of `fn`, so a
  slow reader delays the thread by one copy at most and never loses an
  event (ZMQ queues them meanwhile);
- readers go first: the thread applies batches in slices of at most
  `SLICE_S` under the lock and, when a reader waits, lets it in before the
  next slice (a plain lock would let the busy thread take it back at once,
  again and again: readers starved for seconds under a fast stream);
- `progress` (batches, events, blocks stored and removed so far) is
  replaced after every slice and read without the lock: what a window's
  timer polls, so the Qt thread never waits for the receive thread;
- a publisher restart clears the cache before the new epoch's events;
- errors in the thread are kept in `error` and stop it; `close()` joins it
  (bounded) and releases the sockets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from kvscope.attach.metrics import MetricsPoller
from kvscope.attach.remote_cache import RemoteCache
from kvscope.attach.subscriber import Received, StreamStats, Subscriber

T = TypeVar("T")
SLICE_S = 0.01  # longest the receive thread holds the lock at a time
YIELD_WAITS = 200  # x 0.5 ms: the longest the thread waits for readers to go through


class Progress(NamedTuple):
    batches: int = 0
    events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0


class AttachClient:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
        name: str | None = None,
        record: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self.name = name or endpoint
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self._sub = Subscriber(endpoint, replay_endpoint, topic, bind, record=record)
        self._cache = RemoteCache()
        self._lock = threading.Lock()
        self._waiting = 0  # readers waiting for the lock (changed under _count_lock)
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self.error: str | None = None
        self.metrics: MetricsPoller | None = None  # the server's /metrics, when given
        self.last_ts = 0.0
        self.progress = Progress()
        self._thread = threading.Thread(target=self._run, name=f"kvscope-attach {self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ reading
    def read(self, fn: Callable[[RemoteCache, StreamStats], T]) -> T:
        """`fn(cache, stats)` under the lock: copy out what you need, do not keep references."""
        with self._count_lock:
            self._waiting += 1
        try:
            with self._lock:
                return fn(self._cache, self._sub.stats)
        finally:
            with self._count_lock:
                self._waiting -= 1

    def summary(self) -> str:
        def line(c: RemoteCache, s: StreamStats) -> str:
            stream = f"seq {s.last_seq}, {s.applied} batches"
            if s.gaps or s.lost or s.restarts or s.bad_messages or s.duplicates:
                stream += (
                    f" (gaps {s.gaps}, replayed {s.replayed}, lost {s.lost}, duplicates {s.duplicates}, "
                    f"restarts {s.restarts}, bad messages {s.bad_messages})"
                )
            err = f"; error: {self.error}" if self.error else ""
            metrics = f"; {self.metrics.summary()}" if self.metrics is not None else ""
            return f"{self.name}: {c.summary()}; {stream}{metrics}{err}"

        return self.read(line)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                received = self._sub.poll(100)
                done = 0
                while done < len(received):
                    with self._lock:
                        done = self._apply_slice(received, done)
                    if self._waiting:
                        self._let_readers_in()
        except Exception as exc:  # noqa: BLE001 - kept and shown; the thread ends
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._sub.close()

    def _apply_slice(self, received: list[Received], start: int) -> int:
        """Apply batches from `start` until SLICE_S is spent or a reader waits; the next index."""
        deadline = time.perf_counter() + SLICE_S
        i = start
        c = self._cache
        while i < len(received):
            r = received[i]
            i += 1
            if r.restarted:
                c.clear()
            c.apply_batch(r.batch.events, r.batch.ts)
            self.last_ts = r.batch.ts
            if self._waiting or time.perf_counter() > deadline:
                break
        k = c.counters
        self.progress = Progress(k.batches, k.events, k.blocks_stored, k.blocks_removed)
        return i

    def _let_readers_in(self) -> None:
        for _ in range(YIELD_WAITS):
            if not self._waiting or self._stop.is_set():
                return
            time.sleep(0.0005)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self.metrics is not None:
            self.metrics.close()
