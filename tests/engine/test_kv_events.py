"""The KV event wire format: kvscope's encoder, vLLM-shaped bytes, bad input."""

from __future__ import annotations

import msgspec
import pytest
from vllm_old_encoding import OldBatch, OldRemoved, OldStored

from kvscope.engine.kv_events import (
    MAX_PAYLOAD_BYTES,
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    WireFormatError,
    WireUnknown,
    decode_message,
    decode_payload,
    encode_batch,
    encode_seq,
    hash_from_wire,
    hash_to_wire,
)

STORED = WireBlockStored(
    ("00000000000000aa", "ffffffffffffffff"),
    "0123456789abcdef",
    tuple(range(8)),
    4,
    medium="GPU",
    session_id="s1",
)


def test_round_trip_keeps_every_field_and_kvscope_hashes() -> None:
    events = (STORED, WireBlockRemoved(("ffffffffffffffff",), "GPU"), WireAllBlocksCleared())
    ts, rank, out = decode_payload(encode_batch(events, 12.5, 3))
    assert (ts, rank) == (12.5, 3)
    assert out == events


def test_payload_is_laid_out_as_vllm_writes_it() -> None:
    raw = msgspec.msgpack.decode(encode_batch([STORED], 1.0, 0))
    assert isinstance(raw, list) and raw[0] == 1.0 and raw[2] == 0  # EventBatch is array_like
    ev = raw[1][0]
    assert ev["type"] == "BlockStored"  # events are tagged maps
    assert ev["block_hashes"] == [0xAA, (1 << 64) - 1]  # vLLM's default: unsigned 64-bit ints
    assert ev["parent_block_hash"] == 0x0123456789ABCDEF
    assert list(ev)[:8] == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ]
    assert "group_idx" not in ev  # defaults omitted, as omit_defaults does


def test_reads_the_older_array_encoded_events() -> None:
    # vLLM releases before the tagged-map events declared them array_like:
    # ["BlockStored", hashes, parent, tokens, block_size, lora_id, medium].
    old = OldBatch(2.0, [OldStored([-1, 5], None, [1, 2, 3, 4], 2, None, "GPU"), OldRemoved([5], "GPU")], 1)
    ts, rank, events = decode_payload(msgspec.msgpack.encode(old))
    assert (ts, rank) == (2.0, 1)
    assert events == (
        WireBlockStored(("ffffffffffffffff", "0000000000000005"), None, (1, 2, 3, 4), 2, medium="GPU"),
        WireBlockRemoved(("0000000000000005",), "GPU"),
    )


def test_reads_a_map_encoded_batch_and_bytes_hashes() -> None:
    payload = msgspec.msgpack.encode(
        {
            "ts": 1.5,
            "events": [{"type": "BlockRemoved", "block_hashes": [b"\x01\x02"], "medium": None, "group_idx": 1}],
            "data_parallel_rank": None,
        }
    )
    assert decode_payload(payload) == (1.5, None, (WireBlockRemoved(("0102",), None, 1),))


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"type": "BlockMoved"}, "unknown event type"),
        ({"type": "BlockStored", "block_hashes": [1], "token_ids": ["a"], "block_size": 1}, "token_ids"),
        ({"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 0}, "block_size"),
        ({"type": "BlockStored", "block_hashes": [True], "token_ids": [1], "block_size": 1}, "block hash"),
        ({"type": "BlockStored", "block_hashes": [1, 2], "token_ids": [1, 2, 3], "block_size": 2}, "3 token ids"),
        ({"type": "BlockRemoved", "block_hashes": 7}, "block_hashes"),
        ({"type": "BlockRemoved", "block_hashes": [], "medium": 3}, "medium"),
        ({"no": "type"}, "string 'type'"),
        (42, "tagged map or array"),
    ],
)
def test_a_bad_event_is_named_and_the_rest_of_the_batch_survives(event: object, reason: str) -> None:
    good = {"type": "AllBlocksCleared"}
    _ts, _rank, events = decode_payload(msgspec.msgpack.encode([0.0, [event, good], 0]))
    assert isinstance(events[0], WireUnknown) and reason in events[0].reason
    assert events[1] == WireAllBlocksCleared()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1", "not msgpack"),
        (msgspec.msgpack.encode("batch"), "not str"),
        (msgspec.msgpack.encode([0.0, "events", 0]), "list of events"),
        (msgspec.msgpack.encode([0.0, [], "rank"]), "data_parallel_rank"),
        (msgspec.msgpack.encode([True, [], 0]), "numeric ts"),
    ],
)
def test_a_payload_that_is_not_a_batch_raises_a_clear_error(payload: bytes, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        decode_payload(payload)


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(WireFormatError, match="limit"):
        decode_payload(b"\x00" * (MAX_PAYLOAD_BYTES + 1))


def test_message_frames_are_checked() -> None:
    payload = encode_batch([WireAllBlocksCleared()], 0.0)
    assert decode_message([b"kv@x", encode_seq(7), payload]).seq == 7
    with pytest.raises(WireFormatError, match="3 frames"):
        decode_message([b"kv@x", payload])
    with pytest.raises(WireFormatError, match="8 bytes"):
        decode_message([b"kv@x", b"\x00" * 4, payload])


def test_hashes_round_trip_and_bad_ones_are_refused() -> None:
    for h in ("0000000000000000", "8000000000000001", "ab" * 32):
        assert hash_from_wire(hash_to_wire(h)) == h
    assert hash_from_wire(-2) == "fffffffffffffffe"  # old vLLM: Python hash(), signed
    for bad in (None, 1.5, b"", [1]):
        with pytest.raises(ValueError):
            hash_from_wire(bad)
