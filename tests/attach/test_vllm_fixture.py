"""Streams recorded from a real vLLM 0.32.0 server decode into the cache it held.

The recordings and how they were made: tests/fixtures/README.md. The older
array encoding of the same events (vLLM before tagged maps) must decode equal.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from vllm_old_encoding import OldBatch, OldRemoved, OldStored

from kvscope.attach import RemoteCache
from kvscope.attach.recording import read_recording
from kvscope.engine import demo_model_path
from kvscope.engine.kv_events import (
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    decode_message,
    decode_payload,
    decode_payload_lenient,
    hash_to_wire,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHARED_EVICT = FIXTURES / "vllm-0.32.0-shared-evict.jsonl"
RESET = FIXTURES / "vllm-0.32.0-reset.jsonl"


def batches(path: Path) -> list:  # type: ignore[type-arg]
    return [decode_message(f) for f in read_recording(path)]


@pytest.mark.parametrize("path", [SHARED_EVICT, RESET], ids=["shared-evict", "reset"])
def test_every_recorded_message_decodes_the_same_on_both_paths(path: Path) -> None:
    frames = read_recording(path)
    assert frames
    for topic, _seq, payload in frames:
        assert topic == b"kv@local@kvscope-demo"
        fast = decode_payload(payload)
        assert fast == decode_payload_lenient(payload)
        assert fast[1] == 0  # data_parallel_rank
        assert all(isinstance(e, (WireBlockStored, WireBlockRemoved, WireAllBlocksCleared)) for e in fast[2])


def test_shared_prefix_branch_and_eviction_as_the_server_held_them() -> None:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(demo_model_path())
    bs = batches(SHARED_EVICT)
    assert [b.seq for b in bs] == [0, 1, 2, 3]
    first = bs[0].events[0]
    assert isinstance(first, WireBlockStored) and first.parent_block_hash is None
    assert (first.block_size, first.medium, first.group_idx, first.kv_cache_spec_kind) == (
        32,
        "GPU",
        0,
        "full_attention",
    )
    assert len(first.block_hashes) == 3 and len(first.token_ids) == 96 and first.token_ids[0] == 1  # BOS
    branch = bs[1].events[0]
    assert isinstance(branch, WireBlockStored)
    assert branch.parent_block_hash == first.block_hashes[1]  # 2 blocks shared, the third branches
    assert "Which room does team Falcon" in tok.decode(list(branch.token_ids))
    cache = RemoteCache()
    for b in bs:
        cache.apply_all(b.events, b.ts)
    evicted = bs[2].events[0]
    assert isinstance(evicted, WireBlockRemoved) and cache.get(evicted.block_hashes[0]) is None
    assert evicted.block_hashes[0] == first.block_hashes[2]  # the least recently used leaf went first
    assert (len(cache), cache.counters.blocks_stored, cache.counters.blocks_removed) == (6, 7, 1)
    assert cache.counters.removed_unknown == 0 and not cache.counters.bad_events
    assert sorted(len(c) for c in cache.chains()) == [3, 3]  # the shared prefix + branch; the other prompt
    assert len(cache.children(first.block_hashes[1])) == 1  # its other child was evicted


def test_reset_prefix_cache_arrives_as_all_blocks_cleared() -> None:
    cache = RemoteCache()
    seen = []
    for b in batches(RESET):
        for e in b.events:
            cache.apply(e, b.ts)
            seen.append((type(e).__name__, len(cache)))
    assert seen == [("WireBlockStored", 3), ("WireBlockStored", 4), ("WireAllBlocksCleared", 0), ("WireBlockStored", 3)]
    assert cache.counters.cleared_events == 1


def _old(e: WireBlockStored | WireBlockRemoved) -> OldStored | OldRemoved:
    if isinstance(e, WireBlockStored):
        parent = None if e.parent_block_hash is None else hash_to_wire(e.parent_block_hash)
        hashes = [hash_to_wire(h) for h in e.block_hashes]
        return OldStored(hashes, parent, list(e.token_ids), e.block_size, None, e.medium)  # type: ignore[arg-type]
    return OldRemoved([hash_to_wire(h) for h in e.block_hashes], e.medium)  # type: ignore[misc]


def test_the_recorded_events_in_the_older_array_encoding_decode_to_the_same_cache() -> None:
    new, old = RemoteCache(), RemoteCache()
    for b in batches(SHARED_EVICT):
        new.apply_all(b.events, b.ts)
        payload = msgspec.msgpack.encode(OldBatch(b.ts, [_old(e) for e in b.events], 0))  # type: ignore[arg-type]
        _ts, _rank, events = decode_payload(payload)
        old.apply_all(events, b.ts)
    assert old.to_json()["chains"] == new.to_json()["chains"]
    assert [(b.block_hash, b.parent, b.token_ids) for b in old.blocks()] == [
        (b.block_hash, b.parent, b.token_ids) for b in new.blocks()
    ]
