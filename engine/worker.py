"""EngineWorker: one thread that owns the Engine and makes every MLX call.

Promises:
- the model is loaded and every engine call runs on the worker thread (MLX
  streams belong to the thread that made them);
- `submit(fn)` queues `fn(engine)` and returns a `concurrent.futures.Future`;
  exceptions come back through the future (and as `EngineError` events for
  `KVScopeError`s), never swallowed;
- `cancel(sid)` works from any thread and takes effect within one decode step;
- commands run one at a time in submission order.

Knows nothing about Qt: the window wraps the futures and events in signals.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from kvscope.engine.engine import Engine, EngineConfig
from kvscope.engine.events import SessionId

T = TypeVar("T")
_STOP = object()
# Never set. A stopped worker's thread waits here until the process exits: with
# mlx 0.32 on the CPU, a process whose MLX-using thread has *ended* aborts at
# exit now and then ("terminate called without an active exception", SIGABRT;
# plain mlx-lm in a thread does it too), while a parked thread exits cleanly.
_PARKED = threading.Event()


class EngineWorker:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._engine_ready = threading.Event()
        self._engine: Engine | None = None
        self._config = config
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvscope-engine", daemon=True)
        self._thread.start()
        self._engine_ready.wait()

    @property
    def engine(self) -> Engine:
        """The engine object, for thread-safe calls only (`cancel`, `subscribe`)."""
        assert self._engine is not None
        return self._engine

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._queue.put((fn, fut))
        return fut

    def call(self, fn: Callable[[Engine], T], timeout: float | None = None) -> T:
        """Submit and wait (never from the worker thread itself)."""
        return self.submit(fn).result(timeout)

    def cancel(self, sid: SessionId) -> None:
        self.engine.cancel(sid)

    def pending(self) -> int:
        return self._queue.qsize()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel generation, finish the queued commands, stop taking new ones."""
        if not self._stopped.is_set():
            for sid in list(self.engine.sessions()):
                self.engine.cancel(sid)
            self._queue.put(_STOP)
            self._stopped.wait(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _run(self) -> None:
        self._engine = Engine(self._config)
        self._engine_ready.set()
        try:
            self._serve()
        finally:
            self._stopped.set()
        _PARKED.wait()  # see _PARKED: the thread stays until the process exits

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self._engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller via the future
                fut.set_exception(exc)
