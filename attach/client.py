"""AttachClient: a thread that follows one engine's KV events into a RemoteCache.

Promises:
- the receive thread is the only one that touches the sockets; readers
  (the CLI's summary, the window's timer) get consistent views through
  `read(fn)` under a lock held only for the length of `fn`, so a slow
  reader delays the thread by one copy at most and never loses an event
  (ZMQ queues them meanwhile);
- a publisher restart clears the cache before the new epoch's events;
- errors in the thread are kept in `error` and stop it; `close()` joins it
  (bounded) and releases the sockets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from kvscope.attach.metrics import MetricsPoller
from kvscope.attach.remote_cache import RemoteCache
from kvscope.attach.subscriber import StreamStats, Subscriber

T = TypeVar("T")


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
        self._stop = threading.Event()
        self.error: str | None = None
        self.metrics: MetricsPoller | None = None  # the server's /metrics, when given
        self.batches = 0
        self.last_ts = 0.0
        self._thread = threading.Thread(target=self._run, name=f"kvscope-attach {self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ reading
    def read(self, fn: Callable[[RemoteCache, StreamStats], T]) -> T:
        """`fn(cache, stats)` under the lock: copy out what you need, do not keep references."""
        with self._lock:
            return fn(self._cache, self._sub.stats)

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
                if not received:
                    continue
                for r in received:  # the lock per batch: a reader waits for one batch at most
                    with self._lock:
                        if r.restarted:
                            self._cache.clear()
                        self._cache.apply_all(r.batch.events, r.batch.ts)
                        self.batches += 1
                        self.last_ts = r.batch.ts
        except Exception as exc:  # noqa: BLE001 - kept and shown; the thread ends
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._sub.close()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self.metrics is not None:
            self.metrics.close()
