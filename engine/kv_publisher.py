"""Publishing the engine's block events in vLLM's wire format.

    Engine bus --BlockStored/BlockRemoved/AllBlocksCleared--> to_wire()
        --> KVEventPublisher.publish()   (never blocks the engine thread)
        --> publisher thread: batch what is queued, [topic, seq, payload] on PUB,
            keep the last `buffer_batches` for the replay ROUTER

Promises:
- `NullPublisher` does nothing; `ZmqPublisher` behaves as vLLM's
  `ZmqEventPublisher`: the PUB socket binds when the endpoint has `*` or `::`
  or is ipc/inproc and connects otherwise (`bind=` overrides, e.g. to bind
  one loopback port); sequence numbers start at 0 and
  count batches; a replay request `[b"", start seq]` gets every buffered
  batch from `start` on as `[b"", topic, seq, payload]`, then
  `[b"", b"", -1, b""]` (vLLM 0.32's replies);
- a bad endpoint fails in the constructor with `InvalidRequestError`;
- `close()` sends what is queued (bounded wait) and releases the sockets;
  events published after it are counted (`dropped_after_close`), not raised
  into the engine.

Knows nothing about the engine beyond its event classes; the wire format is
`kv_events`'s.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence

import zmq

from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.events import AllBlocksCleared, BlockRemoved, BlockStored, Event, EventBus
from kvscope.engine.kv_events import (
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    WireEvent,
    encode_batch,
    encode_seq,
)

END_SEQ = -1
# vLLM's name for an engine's own KV cache tier on every backend, its CPU one
# included ("CPU" and "STORAGE" are offload tiers there): kvscope's cache is that tier.
MEDIUM = "GPU"


class KVEventPublisher(ABC):
    """Where the engine's block events go."""

    @abstractmethod
    def publish(self, events: Sequence[WireEvent]) -> None:
        """Queue events; they go out in order, batched."""

    @abstractmethod
    def close(self) -> None:
        """Send what is queued and stop."""


class NullPublisher(KVEventPublisher):
    def publish(self, events: Sequence[WireEvent]) -> None:
        return None

    def close(self) -> None:
        return None


def binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard, IPv6-any or local endpoint, connect anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqPublisher(KVEventPublisher):
    """PUB socket + optional ROUTER replay socket, served by one thread."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        data_parallel_rank: int = 0,
        buffer_batches: int = 10_000,
        max_batch_events: int = 1024,
        hwm: int = 100_000,
        bind: bool | None = None,
    ) -> None:
        self._bind = binds(endpoint) if bind is None else bind
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._replay: zmq.Socket[bytes] | None = None
        try:
            if self._bind:
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise InvalidRequestError(f"KV events endpoint {endpoint!r} / {replay_endpoint!r}: {exc}") from None
        self.endpoint = self._bound(self._pub, endpoint) if self._bind else endpoint
        self.replay_endpoint = self._bound(self._replay, replay_endpoint) if self._replay else None
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._max_batch = max_batch_events
        self._queue: queue.Queue[list[WireEvent] | None] = queue.Queue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._seq = 0
        self._pending = 0  # events queued and not yet sent
        self._sent = threading.Condition()
        self._closed = False
        self.dropped_after_close = 0
        self._thread = threading.Thread(target=self._run, name="kvscope-kv-events", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def sent_batches(self) -> int:
        return self._seq

    def publish(self, events: Sequence[WireEvent]) -> None:
        if self._closed:  # e.g. the engine still working while the process exits: never raise into it
            self.dropped_after_close += len(events)
            return
        if events:
            with self._sent:
                self._pending += len(events)
            self._queue.put(list(events))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything published so far is on the wire; False on timeout."""
        with self._sent:
            return self._sent.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._close_sockets()
        atexit.unregister(self.close)

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        done = False
        while not done:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            events: list[WireEvent] = []
            item: list[WireEvent] | None = first
            while item is not None:
                events.extend(item)
                if len(events) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            done = item is None
            if events:
                self._send(events)
        self._drain_replay()

    def _send(self, events: list[WireEvent]) -> None:
        payload = encode_batch(events, time.time(), self._rank)
        seq = self._seq
        self._pub.send_multipart((self._topic, encode_seq(seq), payload))
        self._buffer.append((seq, payload))
        self._seq += 1
        with self._sent:
            self._pending -= len(events)
            self._sent.notify_all()

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            return  # not a replay request; vLLM ignores these too
        client, _, start = frames
        first = int.from_bytes(start, "big", signed=True)
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", self._topic, encode_seq(seq), payload))
        self._replay.send_multipart((client, b"", b"", encode_seq(END_SEQ), b""))

    def _drain_replay(self) -> None:
        """Answer replay requests that arrived while closing (bounded)."""
        for _ in range(16):
            if self._replay is None or not self._replay.poll(0):
                return
            self._serve_replay()

    def _close_sockets(self) -> None:
        self._pub.close(linger=1000)
        if self._replay is not None:
            self._replay.close(linger=0)

    @staticmethod
    def _bound(sock: zmq.Socket[bytes] | None, endpoint: str | None) -> str | None:
        if sock is None or endpoint is None or endpoint.startswith("inproc://"):
            return endpoint
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        return last.decode() if isinstance(last, bytes) and last else endpoint


def to_wire(event: Event, medium: str | None) -> WireEvent | None:
    """The wire form of an engine block event; None for every other event."""
    if isinstance(event, BlockStored):
        return WireBlockStored(
            tuple(event.block_hashes),
            event.parent_block_hash,
            tuple(event.token_ids),
            event.block_size,
            medium=medium,
            session_id=event.session,
        )
    if isinstance(event, BlockRemoved):
        return WireBlockRemoved(tuple(event.block_hashes), medium=medium)
    if isinstance(event, AllBlocksCleared):
        return WireAllBlocksCleared()
    return None


def publish_block_events(
    subscribe: Callable[[Callable[[Event], None]], Callable[[], None]],
    publisher: KVEventPublisher,
    medium: str | None,
) -> Callable[[], None]:
    """Forward the engine's block events to `publisher`; returns the unsubscribe function."""

    def forward(event: Event) -> None:
        wire = to_wire(event, medium)
        if wire is not None:
            publisher.publish([wire])

    return subscribe(forward)


def publisher_from_config(
    endpoint: str | None, replay_endpoint: str | None, topic: str, bus: EventBus
) -> KVEventPublisher:
    """The engine's publisher: null without an endpoint, else ZMQ fed from `bus`."""
    if not endpoint:
        return NullPublisher()
    pub = ZmqPublisher(endpoint, replay_endpoint, topic)
    publish_block_events(bus.subscribe, pub, MEDIUM)
    return pub
