"""The subscriber over real ZMQ sockets on loopback: late start, gaps, restarts, bad messages.

A lossy relay makes gaps deterministic: kvscope's publisher keeps the batches
(and serves replay); the test forwards only some of them on its own PUB socket.
"""

from __future__ import annotations

import threading
import time

import zmq

from kvscope.attach.remote_cache import RemoteCache
from kvscope.attach.subscriber import Received, Subscriber
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.kv_events import WireAllBlocksCleared, WireBlockRemoved, WireBlockStored, encode_batch, encode_seq
from kvscope.engine.kv_publisher import ZmqPublisher

LOOP = "tcp://127.0.0.1:*"


def stored(i: int, parent: int | None = None) -> WireBlockStored:
    return WireBlockStored((f"{i:016x}",), None if parent is None else f"{parent:016x}", (i, i, i, i), 4)


def buffered(pub: ZmqPublisher) -> list[tuple[int, bytes]]:
    """Every batch `pub` keeps, fetched through its replay socket like any consumer."""
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.connect(pub.replay_endpoint)
    d.send_multipart((b"", encode_seq(0)))
    out = []
    for _ in range(10_000):
        assert d.poll(10_000), "no replay answer"
        _, _topic, seq, payload = d.recv_multipart()
        n = int.from_bytes(seq, "big", signed=True)
        if n == -1:
            break
        out.append((n, payload))
    d.close(0)
    return out


def publish_n(pub: ZmqPublisher, events: list) -> None:  # type: ignore[type-arg]
    """Publish one batch per event (waiting for each to go out)."""
    for e in events:
        pub.publish([e])
        assert pub.flush()


def drain(sub: Subscriber, until: int, polls: int = 200) -> list[Received]:
    """Poll until `until` batches were handed out (bounded in count)."""
    got: list[Received] = []
    for _ in range(polls):
        got += sub.poll(50)
        if sub.stats.applied >= until:
            break
    return got


def relay(topic: bytes = b"kv") -> tuple[zmq.Socket, str]:  # type: ignore[type-arg]
    s = zmq.Context.instance().socket(zmq.PUB)
    s.bind(LOOP)
    return s, s.getsockopt(zmq.LAST_ENDPOINT).decode()


def test_late_subscriber_catches_up_from_replay_and_drops_live_duplicates() -> None:
    pub = ZmqPublisher(LOOP, LOOP, topic="kv")
    try:
        publish_n(pub, [stored(1), stored(2, 1), stored(3, 2)])
        sub = Subscriber(pub.endpoint, pub.replay_endpoint, topic="kv")
        got = drain(sub, 3)
        assert [r.batch.seq for r in got] == [0, 1, 2] and all(r.replayed for r in got)
        publish_n(pub, [stored(4, 3)])
        got = drain(sub, 4)
        assert [r.batch.seq for r in got] == [3]
        assert sub.stats.lost == 0 and sub.stats.applied == 4
        sub.close()
    finally:
        pub.close()


def test_a_gap_is_filled_from_replay_with_every_batch_once() -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:*", LOOP, topic="kv")
    out, ep = relay()
    try:
        publish_n(pub, [stored(1), stored(2, 1)])
        sub = Subscriber(ep, pub.replay_endpoint, topic="kv")
        first = drain(sub, 2)  # initial replay: 0, 1
        frames = dict(buffered(pub))
        for _ in range(200):  # the relay's subscription settles: a 2-frame message (not a batch) until one arrives
            out.send_multipart((b"kv", b"settle"))  # copies still in flight are more bad messages, nothing else
            sub.poll(20)
            if sub.stats.received:
                break
        assert sub.stats.bad_messages >= 1
        out.send_multipart((b"kv", encode_seq(1), frames[1]))  # seq 1 again: the replay delivered it
        for _ in range(200):
            sub.poll(20)
            if sub.stats.duplicates:
                break
        assert sub.stats.duplicates == 1 and sub.stats.restarts == 0
        publish_n(pub, [stored(3, 2), WireBlockRemoved((f"{1:016x}",)), stored(5)])
        frames = dict(buffered(pub))
        out.send_multipart((b"kv", encode_seq(4), frames[4]))  # 2 and 3 are lost on the way
        got = first + drain(sub, 5)
        assert [r.batch.seq for r in got] == [0, 1, 2, 3, 4]
        assert sub.stats.gaps == 1 and sub.stats.lost == 0
        cache = RemoteCache()
        for r in got:
            cache.apply_all(r.batch.events)
        assert sorted(b.block_hash for b in cache.blocks()) == [f"{i:016x}" for i in (2, 3, 5)]
        sub.close()
    finally:
        out.close(0)
        pub.close()


def test_without_replay_a_gap_is_counted_as_lost() -> None:
    out, ep = relay()
    sub = Subscriber(ep, None, topic="kv")
    payload = encode_batch([stored(1)], 0.0)
    try:
        for _ in range(200):
            out.send_multipart((b"kv", encode_seq(0), payload))
            sub.poll(20)
            if sub.stats.received:
                break
        out.send_multipart((b"kv", encode_seq(5), payload))
        drain(sub, 2)
        assert sub.stats.gaps == 1 and sub.stats.lost == 4
    finally:
        sub.close()
        out.close(0)


def test_a_restarted_publisher_starts_a_new_epoch_and_clears() -> None:
    pub = ZmqPublisher(LOOP, LOOP, topic="kv")
    ep, rep = pub.endpoint, pub.replay_endpoint
    publish_n(pub, [stored(1), stored(2, 1), stored(3, 2)])
    sub = Subscriber(ep, rep, topic="kv")
    drain(sub, 3)
    publish_n(pub, [stored(4, 3)])
    drain(sub, 4)  # a live batch: seq 3
    pub.close()
    pub2 = None
    for _ in range(100):  # ZMQ releases a closed socket's port on its I/O thread: retry the bind (bounded)
        try:
            pub2 = ZmqPublisher(ep, rep, topic="kv", bind=True)  # the same endpoints, a new seq from 0
            break
        except InvalidRequestError:
            time.sleep(0.05)
    assert pub2 is not None
    try:
        got: list[Received] = []
        for _ in range(20):
            publish_n(pub2, [stored(9)])
            got += drain(sub, sub.stats.applied + 1, polls=10)
            if any(r.restarted for r in got):
                break
        assert sub.stats.restarts == 1
        assert got[0].restarted and got[0].batch.seq == 0
        cache = RemoteCache()
        for r in got:
            if r.restarted:
                cache.clear()
            cache.apply_all(r.batch.events)
        assert {b.block_hash for b in cache.blocks()} == {f"{9:016x}"}
        sub.close()
    finally:
        pub2.close()


def _rebind(ep: str, rep: str) -> ZmqPublisher:
    for _ in range(100):  # ZMQ releases a closed socket's port on its I/O thread: retry the bind (bounded)
        try:
            return ZmqPublisher(ep, rep, topic="kv", bind=True)
        except InvalidRequestError:
            time.sleep(0.05)
    raise AssertionError(f"could not bind {ep} and {rep} again")


def test_a_restarted_publisher_already_past_the_last_seq_is_a_new_epoch_not_a_gap() -> None:
    """The new process counts from 0, but the first live batch seen is seq 4 > 2, the last one seen:
    a gap by its number. The replay's batch at seq 2 has another timestamp: a restart, replayed from 0."""
    pub = ZmqPublisher(LOOP, LOOP, topic="kv")
    out, ep = relay()
    rep = pub.replay_endpoint
    publish_n(pub, [stored(1), stored(2, 1), stored(3, 2)])
    sub = Subscriber(ep, rep, topic="kv", idle_replay_s=3600)
    pub2 = None
    try:
        assert [r.batch.seq for r in drain(sub, 3)] == [0, 1, 2]
        pub.close()
        pub2 = _rebind(LOOP, rep)
        publish_n(pub2, [stored(10 + i) for i in range(5)])  # seq 0-4 of the new epoch
        frames = dict(buffered(pub2))
        for _ in range(200):  # the relay's subscription settles
            out.send_multipart((b"kv", b"settle"))
            sub.poll(20)
            if sub.stats.received:
                break
        out.send_multipart((b"kv", encode_seq(4), frames[4]))
        got = drain(sub, 8)
        assert sub.stats.restarts == 1 and sub.stats.lost == 0
        assert got[0].restarted and [r.batch.seq for r in got] == [0, 1, 2, 3, 4]
        cache = RemoteCache()
        for r in got:
            if r.restarted:
                cache.clear()
            cache.apply_all(r.batch.events)
        assert sorted(b.block_hash for b in cache.blocks()) == [f"{10 + i:016x}" for i in range(5)]
    finally:
        sub.close()
        out.close(0)
        (pub2 or pub).close()


def test_bad_messages_are_counted_never_raised() -> None:
    out, ep = relay()
    sub = Subscriber(ep, None, topic="kv")
    try:
        for _ in range(200):
            out.send_multipart((b"kv", b"short", b"x"))
            sub.poll(20)
            if sub.stats.received:
                break
        out.send_multipart((b"kv", encode_seq(0), b"\xc1"))
        out.send_multipart((b"kv", b"only two frames"))
        for _ in range(50):
            sub.poll(20)
            if sub.stats.received >= sub.stats.bad_messages >= 3:
                break
        assert sub.stats.bad_messages >= 3 and sub.stats.applied == 0
        assert "not msgpack" in sub.stats.last_error or "frames" in sub.stats.last_error
    finally:
        sub.close()
        out.close(0)


def test_all_blocks_cleared_empties_the_cache() -> None:
    cache = RemoteCache()
    cache.apply_all([stored(1), stored(2, 1)])
    assert len(cache) == 2
    cache.apply(WireAllBlocksCleared())
    assert len(cache) == 0 and cache.counters.cleared_events == 1


def test_reads_the_older_three_frame_replay_replies_and_counts_junk() -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(LOOP)
    ep = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    payload = encode_batch([stored(1)], 1.0)

    def serve() -> None:  # an older vLLM's replay: [b"", seq, payload] ... [b"", -1, b""]
        if router.poll(10_000):
            client, _, _start = router.recv_multipart()
            router.send_multipart((client, b"junk", b"reply"))
            router.send_multipart((client, b"", encode_seq(0), payload))
            router.send_multipart((client, b"", encode_seq(-1), b""))

    t = threading.Thread(target=serve)
    t.start()
    out, live = relay()
    sub = Subscriber(live, ep)
    try:
        got = sub.poll(10)  # the initial replay
        t.join(10)
        assert [(r.batch.seq, r.replayed) for r in got] == [(0, True)]
        assert got[0].batch.events == (stored(1),) and sub.stats.bad_messages == 1
    finally:
        sub.close()
        out.close(0)
        router.close(0)


def test_a_batch_dropped_before_subscribing_is_fetched_when_the_stream_goes_quiet() -> None:
    pub = ZmqPublisher(LOOP, LOOP, topic="kv")
    out, silent = relay()  # the live stream never carries anything
    sub = Subscriber(silent, pub.replay_endpoint, idle_replay_s=0.2)
    try:
        assert sub.poll(10) == []  # the initial replay: nothing published yet
        publish_n(pub, [stored(1)])
        got = drain(sub, 1)
        assert [(r.batch.seq, r.replayed) for r in got] == [(0, True)] and sub.stats.lost == 0
    finally:
        sub.close()
        out.close(0)
        pub.close()


def test_publishing_after_close_is_counted_not_raised() -> None:
    pub = ZmqPublisher(LOOP, None)
    publish_n(pub, [stored(1)])
    pub.close()
    pub.publish([stored(2), stored(3)])  # the engine may still emit while the process exits
    assert pub.dropped_after_close == 2 and pub.sent_batches == 1


def test_a_bad_publisher_endpoint_is_a_clear_error() -> None:
    import pytest

    from kvscope.engine import Engine, EngineConfig

    with pytest.raises(InvalidRequestError, match="KV events endpoint 'nonsense'"):
        ZmqPublisher("nonsense")
    with pytest.raises(InvalidRequestError, match="KV events endpoint"):
        Engine(EngineConfig(kv_events="tcp://127.0.0.1:*", kv_events_replay="tcp://999.0.0.1:1"))


def test_hot_blocks_are_the_reused_then_the_branching_ones() -> None:
    cache = RemoteCache()
    cache.apply_all([stored(1), stored(2, 1), stored(3, 1), stored(4)])
    cache.apply(stored(4))  # reported again: vLLM's kv_cache_report_mode "full" on a hit
    assert [b.block_hash for b in cache.hot()] == [f"{4:016x}", f"{1:016x}"]
    assert cache.to_json()["hot"] == [
        {"hash": f"{4:016x}", "reuses": 1, "children": 0},
        {"hash": f"{1:016x}", "reuses": 0, "children": 2},
    ]
    assert cache.counters.reuses == 1 and len(cache) == 4  # a reuse is not a second block
