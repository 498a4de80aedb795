"""Start and stop `kvscope serve` on an `EngineWorker`: blocking (the CLI) or in a thread (tests, the window).

`Server` wires a worker (whose engine has a model loaded) to the app and
runs uvicorn, a well-kept ASGI server; port 0 picks a free port and
`Server.port` tells which. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from kvscope.engine.worker import EngineWorker
from kvscope.server.app import ServedModel, create_app
from kvscope.server.records import RequestLog
from kvscope.server.runner import Runner


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    record: str | None = None  # JSON-lines file of request bodies
    session_budget_bytes: int | None = None  # cap on request sessions' cache (None: the memory budget)
    model_alias: str | None = None  # also accept this name (the --model argument)
    log_level: str = "warning"
    stream_interval_ms: float = 20.0  # a stream's pieces go out at most this often (the first at once); 0: every token


class Server:
    """One OpenAI-compatible server over an engine worker with a loaded model."""

    def __init__(
        self, worker: EngineWorker, options: ServeOptions | None = None, model: tuple[str, str] | None = None
    ) -> None:
        """`model` is the loaded model's (name, path); None asks the engine thread (and waits)."""
        self.options = opts = options or ServeOptions()
        self.worker = worker
        name, path = model or worker.call(lambda eng: (eng.model.name, str(eng.model.path)))
        aliases = tuple(a for a in (opts.model_alias, path) if a)
        self.model = ServedModel(name, aliases, int(time.time()))
        self.log = RequestLog(Path(opts.record) if opts.record else None)
        self.runner = Runner(
            worker, self.log, opts.session_budget_bytes, stream_interval_s=opts.stream_interval_ms / 1000
        )
        app = create_app(self.runner, self.model, opts.api_key)
        config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        servers = getattr(self._uvicorn, "servers", [])
        for s in servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.options.port

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.port}/v1"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self._uvicorn.run()

    def start(self, timeout: float = 30.0) -> Server:
        """Serve from a daemon thread; returns once the socket listens."""
        self._thread = threading.Thread(target=self._run_quietly, name="kvscope-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise OSError(f"kvscope serve could not listen on {self.options.host}:{self.options.port}")
            if time.monotonic() > deadline:
                raise TimeoutError("kvscope serve did not start")
            time.sleep(0.02)
        return self

    def _run_quietly(self) -> None:
        try:
            self._uvicorn.run()
        except (SystemExit, OSError):  # uvicorn exits when it cannot bind; `start` reports it
            pass

    def stop(self, timeout: float = 10.0) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
