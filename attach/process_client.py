"""AttachProcess: an AttachClient in a process of its own, for the window.

    window process                              attach process (a fresh python, see _BOOT)
    Qt thread --(fn)--> socketpair --> serve loop --> AttachClient.read(fn) --> reply
    reader thread <--- progress every 50 ms ------ receive thread: sockets, decode, RemoteCache

Why a process: decoding and applying a busy stream is Python work that
holds the GIL. On a thread of the window's process it made every return of
the Qt thread into Python (each paint callback of pyqtgraph) wait its turn,
and the cache's objects lengthened every full garbage collection, which
stops all threads: the window froze for 0.2-0.5 s at a time under 10,000+
events/s (`bench/attach.py`). In its own process the stream costs the
window nothing but the grids it draws.

Promises (the surface `AttachView` and `fleet` use, as `AttachClient`'s):
- `read(fn)` runs `fn(cache, stats)` in the attach process under its lock
  and returns the result; `fn` must pickle by reference to a module the
  attach process can import (a module-level function of kvscope, or a
  `functools.partial` of one): one that does not raises in the caller
  (`pickle.PicklingError`, `AttributeError`) or comes back as `RuntimeError`;
  an exception in `fn` comes back as `RuntimeError` naming it; a read that gets no answer in `READ_TIMEOUT_S`
  raises `TimeoutError`;
- `progress` and `error` are plain attributes, updated by a reader thread
  from what the attach process pushes (at most every `PUSH_S`): lock-free
  for the Qt thread;
- a bad endpoint (not ZMQ, or a port already taken when binding) raises
  `ValueError` in the constructor, before any process starts;
- `close()` stops the process (asks, then waits bounded, then terminates
  that one process by its handle) and fails reads still waiting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import zmq

from kvscope.attach.client import AttachClient, Progress
from kvscope.attach.gc_pauses import freeze_startup_heap
from kvscope.attach.metrics import MetricsPoller
from kvscope.attach.remote_cache import RemoteCache
from kvscope.attach.subscriber import StreamStats, attach_socket

T = TypeVar("T")
# The attach process starts with this instead of `-m`: kvscope.engine's __init__ preloads BLAS and
# imports mlx and the whole engine (seconds, hundreds of MB); the attach process needs two of its
# pure-Python modules (kv_events, blocks), so the package is entered without running its __init__.
_BOOT = (
    "import sys, importlib.util as u\n"
    "if sys.path and sys.path[0] == '':\n"  # -c puts the working folder first: never import from it
    "    del sys.path[0]\n"
    "spec = u.find_spec('kvscope.engine')\n"
    "if spec is not None and spec.submodule_search_locations is not None:\n"
    "    sys.modules['kvscope.engine'] = u.module_from_spec(spec)\n"
    "from kvscope.attach.process_client import main\n"
    "main(sys.argv[1:])\n"
)
PUSH_S = 0.05
READ_TIMEOUT_S = 60.0  # the first read waits for the process to start (imports: seconds on a loaded machine)
STOP_TIMEOUT_S = 10.0


def process_id(_cache: RemoteCache, _stats: StreamStats) -> int:
    """The id of the process that holds the cache (a read: `client.read(process_id)`)."""
    return os.getpid()


def check_endpoint(endpoint: str, bind: bool) -> None:
    """ValueError when `endpoint` cannot be bound or connected by a SUB socket (tried, then released)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    try:
        attach_socket(sock, endpoint, bind)
    finally:
        sock.close(linger=0)


def _serve(conn: Any, kwargs: dict[str, Any], record_path: str | None) -> None:  # the attach process
    from kvscope.attach.recording import Recorder

    recorder = Recorder(record_path, append=True) if record_path else None
    try:
        client = AttachClient(**kwargs, record=recorder)
    except ValueError as exc:
        conn.send(("progress", Progress(), str(exc)))
        return
    freeze_startup_heap()  # the imports (zmq, msgspec, numpy, mlx) are not walked by every full collection
    last: tuple[Progress, str | None] | None = None
    try:
        while True:
            if conn.poll(PUSH_S):
                msg = conn.recv()
                if msg is None:
                    break
                rid, fn_bytes = msg
                try:
                    conn.send(("reply", rid, True, client.read(pickle.loads(fn_bytes))))
                except Exception as exc:  # noqa: BLE001 - the caller gets it as RuntimeError
                    conn.send(("reply", rid, False, f"{type(exc).__name__}: {exc}"))
            now = (client.progress, client.error)
            if now != last:
                conn.send(("progress", *now))
                last = now
    except (EOFError, OSError, BrokenPipeError):
        pass  # the window went away
    finally:
        client.close()
        if recorder is not None:
            recorder.close()


class AttachProcess:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        bind: bool = False,
        name: str | None = None,
        record_path: str | None = None,
    ) -> None:
        check_endpoint(endpoint, bind)
        self.name = name or endpoint
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.metrics: MetricsPoller | None = None  # scraped here, in the window's process
        self.progress = Progress()
        self.error: str | None = None
        self._ids = itertools.count()
        self._pending: dict[int, Future[tuple[bool, Any]]] = {}
        self._send_lock = threading.Lock()
        self._closing = False
        # a fresh interpreter, not fork (the window runs Qt and threads) nor multiprocessing's spawn
        # (which imports the parent's __main__ again): _BOOT, then main(), talking over a socketpair
        ours, theirs = socket.socketpair()
        kwargs = {"endpoint": endpoint, "replay_endpoint": replay_endpoint, "topic": topic, "bind": bind, "name": name}
        config = json.dumps({"client": kwargs, "record_path": record_path})
        cmd = [sys.executable, "-c", _BOOT, str(theirs.fileno()), config]
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._reader = threading.Thread(target=self._read_loop, name=f"kvscope-attach-pipe {self.name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def read(self, fn: Callable[[RemoteCache, StreamStats], T]) -> T:
        fn_bytes = pickle.dumps(fn)  # a lambda fails here, in the caller, not in the attach process
        fut: Future[tuple[bool, Any]] = Future()
        rid = next(self._ids)
        with self._send_lock:
            if self._closing or not self._reader.is_alive():
                raise RuntimeError(f"{self.name}: the attach process has ended ({self.error or 'closed'})")
            self._pending[rid] = fut
            self._conn.send((rid, fn_bytes))
        ok, value = fut.result(timeout=READ_TIMEOUT_S)
        if not ok:
            raise RuntimeError(f"{self.name}: {value}")
        return value  # type: ignore[no-any-return]

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "progress":
                    self.progress, self.error = msg[1], msg[2]
                elif msg[0] == "reply":
                    fut = self._pending.pop(msg[1], None)
                    if fut is not None:
                        fut.set_result((msg[2], msg[3]))
        except (EOFError, OSError):
            if not self._closing and self.error is None:
                self.error = "the attach process ended"
        finally:
            with self._send_lock:
                pending, self._pending = self._pending, {}
            for fut in pending.values():
                fut.set_result((False, self.error or "the attach process ended"))

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        with self._send_lock:
            if self._closing:
                return
            self._closing = True
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.terminate()  # this one child, by its handle
            self._proc.wait(timeout_s)
        self._reader.join(timeout_s)  # it reads to the end of the pipe, which the ended process closed
        self._conn.close()
        if self.metrics is not None:
            self.metrics.close()


def main(argv: list[str] | None = None) -> None:
    """The attach process: `python -c _BOOT FD CONFIG_JSON`."""
    ap = argparse.ArgumentParser(description="kvscope's attach process (started by AttachProcess)")
    ap.add_argument("fd", type=int)
    ap.add_argument("config")
    args = ap.parse_args(argv)
    config = json.loads(args.config)
    _serve(Connection(args.fd), config["client"], config["record_path"])
