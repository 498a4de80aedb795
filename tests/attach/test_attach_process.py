"""AttachProcess: the stream decoded in a process of its own, read from the window's process."""

from __future__ import annotations

import os
import pickle
import signal
import time
from functools import partial

import pytest

from kvscope.attach.chain_grid import view_grid
from kvscope.attach.fleet import cached_prefix, content_keys
from kvscope.attach.process_client import AttachProcess, process_id
from kvscope.engine.kv_events import WireBlockStored
from kvscope.engine.kv_publisher import ZmqPublisher

LOOP = "tcp://127.0.0.1:*"


def h(i: int) -> str:
    return f"{i:016x}"


def wait_for(cond: object, timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def here_only(_cache: object, _stats: object) -> int:
    return 0  # a test module's function: the attach process cannot import it


def test_the_cache_lives_in_the_attach_process_and_reads_come_back() -> None:
    pub = ZmqPublisher(LOOP, LOOP, topic="kv@p")
    client = AttachProcess(pub.endpoint, pub.replay_endpoint)
    try:
        pub.publish([WireBlockStored((h(1), h(2)), None, tuple(range(8)), 4)])
        assert pub.flush()
        wait_for(lambda: client.progress.blocks_stored == 2)  # pushed, read here without a lock
        assert client.read(process_id) == client.pid != os.getpid()
        assert len(client.read(content_keys)) == 2
        assert client.read(partial(cached_prefix, token_ids=tuple(range(10)))) == 8
        grid = client.read(view_grid)
        assert grid.rows == ((h(1), h(2)),) and grid.batches == 1
        with pytest.raises((pickle.PicklingError, AttributeError)):
            client.read(lambda c, _s: len(c))  # refused here: it cannot travel
        with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
            client.read(here_only)
        with pytest.raises(RuntimeError, match="TypeError"):
            client.read(partial(cached_prefix, token_ids=None))  # type: ignore[arg-type]  # raises in there
        assert client.alive and client.read(process_id) == client.pid  # neither broke the process
    finally:
        client.close()
        pub.close()
    assert not client.alive


def test_a_bad_endpoint_fails_before_a_process_starts() -> None:
    with pytest.raises(ValueError, match="cannot connect"):
        AttachProcess("not an endpoint")


def test_an_attach_process_that_dies_is_reported_and_reads_fail() -> None:
    pub = ZmqPublisher(LOOP, LOOP, topic="kv@p")
    client = AttachProcess(pub.endpoint, pub.replay_endpoint)
    try:
        assert client.read(process_id) == client.pid
        os.kill(client.pid, signal.SIGKILL)  # our own child, by its id
        wait_for(lambda: client.error is not None)
        assert client.error == "the attach process ended"
        with pytest.raises(RuntimeError, match="ended"):
            client.read(process_id)
    finally:
        client.close()
        pub.close()
