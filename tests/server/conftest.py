"""A real `kvscope serve` on loopback (uvicorn in a thread) and the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kvscope.engine.worker import EngineWorker
from kvscope.server import ServeOptions, Server


def start_server(model: str | Path | None, **options: object) -> tuple[Server, EngineWorker]:
    worker = EngineWorker()
    worker.call(lambda eng: eng.load(model))
    return Server(worker, ServeOptions(port=0, **options)).start(), worker  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    record = tmp_path_factory.mktemp("serve") / "log.jsonl"
    server, worker = start_server(None, record=str(record))
    yield server
    server.stop()
    worker.shutdown()


@pytest.fixture()
def client(demo_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.base_url, api_key="unused", max_retries=0)
