"""kvscope's engine publishes vLLM KV events; `kvscope attach` and a plain vLLM-style consumer read them.

The oracle is the engine itself: the blocks in its prefix store (hash, parent,
token ids) and the block hashes its session snapshots show.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import zmq

from kvscope.attach import AttachClient
from kvscope.engine import Engine, EngineConfig, SamplingParams

SYSTEM = "You are a careful assistant. " * 6


# A consumer written the way vLLM's own example subscriber is: msgspec structs
# declared from vLLM's schema (an array-like batch of tagged-map events).
class _Ev(msgspec.Struct, tag=True):
    pass


class BlockStored(_Ev):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    session_id: str | None = None


class BlockRemoved(_Ev):
    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(_Ev):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def plain_consumer_blocks(replay_endpoint: str) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """Replay everything with a bare DEALER and typed msgspec decoding; hash -> (parent, tokens)."""
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.connect(replay_endpoint)
    d.send_multipart((b"", (0).to_bytes(8, "big")))
    blocks: dict[str, tuple[str | None, tuple[int, ...]]] = {}
    for _ in range(100_000):
        assert d.poll(10_000)
        _, _topic, seq, payload = d.recv_multipart()  # vLLM 0.32's replay reply
        if int.from_bytes(seq, "big", signed=True) == -1:
            break
        for ev in dec.decode(payload).events:
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                for i, h in enumerate(ev.block_hashes):
                    assert isinstance(h, int) and ev.medium == "GPU"
                    toks = tuple(ev.token_ids[i * ev.block_size : (i + 1) * ev.block_size])
                    blocks[f"{h:016x}"] = (None if parent is None else f"{parent:016x}", toks)
                    parent = h
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    blocks.pop(f"{h:016x}", None)
            else:
                blocks.clear()
    d.close(0)
    return blocks


def engine_blocks(eng: Engine) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    store = eng.store
    assert store is not None
    return {h: (b.parent, b.token_ids) for h, b in store._blocks.items()}


def attached_blocks(client: AttachClient) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    return client.read(lambda c, _s: {b.block_hash: (b.parent, b.token_ids) for b in c.blocks()})


def wait_same(client: AttachClient, want: dict, polls: int = 400) -> None:  # type: ignore[type-arg]
    for _ in range(polls):  # bounded in count
        if attached_blocks(client) == want:
            return
        time.sleep(0.025)


def test_engine_events_reach_attach_and_a_plain_vllm_consumer(llama_dir: Path) -> None:
    cfg = EngineConfig(
        block_size=8, kv_events="tcp://127.0.0.1:*", kv_events_replay="tcp://127.0.0.1:*", kv_events_topic="kv@t"
    )
    eng = Engine(cfg)
    pub = eng.kv_publisher
    client = AttachClient(pub.endpoint, pub.replay_endpoint, topic="kv@")  # type: ignore[attr-defined]
    try:
        eng.load(llama_dir)
        a = eng.new_session("a", system=SYSTEM)
        b = eng.new_session("b", system=SYSTEM)
        p = SamplingParams(max_tokens=4, temperature=0.0)
        eng.chat(a, "one two three four five six seven", p)
        eng.chat(b, "eight nine ten eleven twelve thirteen", p)  # shares the system prompt's blocks
        want = engine_blocks(eng)
        assert len(want) >= 4
        wait_same(client, want)
        assert attached_blocks(client) == want
        # every block the sessions' snapshots show as full is one the attached view holds, parents included
        for sid in (a, b):
            shown = [h for h in eng.snapshot(sid).block_hashes if h is not None]
            assert set(shown) & set(want) and set(shown) & set(want) <= set(attached_blocks(client))
        shared = client.read(lambda c, _s: [x for x in c.blocks() if len(c.children(x.block_hash)) > 1])
        assert shared, "the two sessions branch after their common prefix"
        assert plain_consumer_blocks(pub.replay_endpoint) == want  # type: ignore[attr-defined]

        eng.close_session(a)
        eng.close_session(b)
        store = eng.store
        assert store is not None
        assert store.evict_to_budget(0) > 0  # everything unreferenced goes: BlockRemoved
        wait_same(client, {})
        assert attached_blocks(client) == {} == engine_blocks(eng)
        assert client.read(lambda c, _s: c.counters.blocks_removed) == len(want)
        assert plain_consumer_blocks(pub.replay_endpoint) == {}  # type: ignore[attr-defined]

        c = eng.new_session("c", system=SYSTEM)
        eng.chat(c, "one more", p)
        wait_same(client, engine_blocks(eng))
        assert attached_blocks(client)
        eng.load(llama_dir)  # a (re)load drops the old model's blocks: AllBlocksCleared
        wait_same(client, {})
        assert attached_blocks(client) == {} and client.read(lambda c, _s: c.counters.cleared_events) == 1
    finally:
        client.close()
        pub.close()
