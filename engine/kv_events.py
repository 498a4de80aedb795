"""vLLM's KV events on the wire: the one module that encodes and decodes them.

The format is vLLM's (`vllm/distributed/kv_events.py`, `ZmqEventPublisher`)::

    ZMQ PUB message   [topic (utf-8), seq (8 bytes, big-endian), payload]
    payload (msgpack) EventBatch  [ts, [event, ...], data_parallel_rank]
                      (a map {"ts", "events", "data_parallel_rank"} is read too)
    event   (msgpack) {"type": "BlockStored", "block_hashes": [...], ...}   tagged map
                      ["BlockStored", block_hashes, parent, token_ids, ...] tagged array
                      (older vLLM releases: array_like structs; read, never written)
    replay  (ROUTER)  request [b"", start seq]  ->  [b"", topic, seq, payload] ... [b"", b"", -1, b""]
                      (older vLLM: [b"", seq, payload] ... [b"", -1, b""])

Promises:
- `encode_batch` writes what vLLM's own msgspec structs write (same field
  names and order, defaults omitted), so any consumer of vLLM's events reads
  kvscope's;
- `decode_payload` never raises for one bad event: an unknown or malformed
  event becomes a `WireUnknown` naming what was wrong; only a payload that is
  not a batch at all raises `WireFormatError`;
- block hashes come out as lowercase hex strings whatever their wire type:
  an int as 16 hex digits (two's complement, as vLLM's int hashes and the
  old Python `hash()` ones), bytes as their hex. kvscope's own 16-hex-digit
  hashes travel as unsigned 64-bit ints, vLLM's default, and come back equal.

Knows nothing about sockets, threads or the engine's internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

MAX_PAYLOAD_BYTES = 64 << 20  # one batch; vLLM's are a few KB
_U64 = (1 << 64) - 1


class WireFormatError(ValueError):
    """A message or payload that is not a vLLM KV event batch."""


# ---------------------------------------------------------------- decoded events
@dataclass(frozen=True, slots=True)
class WireBlockStored:
    """Full blocks entered the cache: a chain under `parent_block_hash`."""

    block_hashes: tuple[str, ...]
    parent_block_hash: str | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    lora_id: int | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    session_id: str | None = None  # the request context that stored (or reused) the blocks


@dataclass(frozen=True, slots=True)
class WireBlockRemoved:
    block_hashes: tuple[str, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class WireAllBlocksCleared:
    pass


@dataclass(frozen=True, slots=True)
class WireUnknown:
    """An event that could not be read: counted and shown, never applied."""

    type_name: str
    reason: str


WireEvent = WireBlockStored | WireBlockRemoved | WireAllBlocksCleared | WireUnknown


@dataclass(frozen=True, slots=True)
class WireBatch:
    """One ZMQ message: a sequence number and the events of one engine step."""

    seq: int
    topic: str
    ts: float
    data_parallel_rank: int | None
    events: tuple[WireEvent, ...]


# ---------------------------------------------------------------- encoding
# Declared like vLLM 0.32's structs (same fields in the same order; omit_defaults
# drops the same optional ones), tagged by class name under "type".
class _Event(msgspec.Struct, omit_defaults=True, tag_field="type", tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(_Event):
    pass


class _Batch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_fast_decoder = msgspec.msgpack.Decoder(_Batch)


def hash_to_wire(h: str) -> int | bytes:
    """kvscope's hex hash as vLLM sends hashes: <= 16 hex digits as an int, longer as bytes."""
    if len(h) <= 16:
        return int(h, 16)
    return bytes.fromhex(h)


def hash_from_wire(h: object) -> str:
    """Any wire hash (int, bytes, str) as a lowercase hex string; ValueError otherwise."""
    if isinstance(h, bool):
        raise ValueError(f"a block hash cannot be {h!r}")
    if isinstance(h, int):
        return f"{h & _U64:016x}"
    if isinstance(h, (bytes, bytearray, memoryview)):
        if not len(h):
            raise ValueError("empty block hash")
        return bytes(h).hex()
    if isinstance(h, str) and h:
        return h.lower()
    raise ValueError(f"a block hash must be int or bytes, not {type(h).__name__}")


def _to_struct(ev: WireEvent) -> BlockStored | BlockRemoved | AllBlocksCleared:
    if isinstance(ev, WireBlockStored):
        return BlockStored(
            block_hashes=[hash_to_wire(h) for h in ev.block_hashes],
            parent_block_hash=None if ev.parent_block_hash is None else hash_to_wire(ev.parent_block_hash),
            token_ids=list(ev.token_ids),
            block_size=ev.block_size,
            lora_id=ev.lora_id,
            medium=ev.medium,
            lora_name=ev.lora_name,
            session_id=ev.session_id,
        )
    if isinstance(ev, WireBlockRemoved):
        return BlockRemoved(block_hashes=[hash_to_wire(h) for h in ev.block_hashes], medium=ev.medium)
    if isinstance(ev, WireAllBlocksCleared):
        return AllBlocksCleared()
    raise TypeError(f"cannot encode {type(ev).__name__}")


def encode_batch(events: Sequence[WireEvent], ts: float, data_parallel_rank: int | None = 0) -> bytes:
    """The msgpack payload of one batch, as vLLM's publisher writes it."""
    return _encoder.encode(_Batch(ts, [_to_struct(e) for e in events], data_parallel_rank))


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


# ---------------------------------------------------------------- decoding
_POSITIONAL = {  # field order of the array-encoded (older vLLM) events, after the tag
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
        "locality",
        "ownership",
        "session_id",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx", "locality", "ownership"),
    "AllBlocksCleared": (),
}


def decode_message(frames: Sequence[bytes]) -> WireBatch:
    """A received multipart message `[topic, seq, payload]` as a batch."""
    if len(frames) != 3:
        raise WireFormatError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq_bytes, payload = frames
    seq = decode_seq(seq_bytes)
    ts, rank, events = decode_payload(payload)
    return WireBatch(seq, bytes(topic).decode("utf-8", "replace"), ts, rank, events)


def decode_seq(seq_bytes: bytes) -> int:
    if len(seq_bytes) != 8:
        raise WireFormatError(f"a sequence number is 8 bytes, got {len(seq_bytes)}")
    return int.from_bytes(seq_bytes, "big", signed=True)


def decode_payload(payload: bytes) -> tuple[float, int | None, tuple[WireEvent, ...]]:
    """`(ts, data_parallel_rank, events)` of one msgpack EventBatch."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireFormatError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:  # fast path: today's vLLM layout, validated in C by msgspec
        b = _fast_decoder.decode(payload)
        return float(b.ts), b.data_parallel_rank, tuple(_from_struct(e) for e in b.events)
    except (msgspec.DecodeError, ValueError):
        return decode_payload_lenient(payload)  # an older layout, or something to name event by event


def decode_payload_lenient(payload: bytes) -> tuple[float, int | None, tuple[WireEvent, ...]]:
    """`decode_payload` without the fast path: every layout, each event checked on its own."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireFormatError(f"payload is not msgpack: {exc}") from None
    if isinstance(obj, dict):
        ts, events, rank = obj.get("ts"), obj.get("events"), obj.get("data_parallel_rank")
    elif isinstance(obj, list) and len(obj) in (2, 3):
        ts, events, rank = obj[0], obj[1], obj[2] if len(obj) == 3 else None
    else:
        raise WireFormatError(f"an event batch is [ts, events, rank] or a map, not {type(obj).__name__}")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not isinstance(events, list):
        raise WireFormatError("an event batch needs a numeric ts and a list of events")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise WireFormatError(f"data_parallel_rank must be an int, not {type(rank).__name__}")
    return float(ts), rank, tuple(decode_event(e) for e in events)


def _from_struct(e: BlockStored | BlockRemoved | AllBlocksCleared) -> WireEvent:
    if isinstance(e, BlockStored):
        n = len(e.block_hashes)
        if e.block_size <= 0 or (e.token_ids and len(e.token_ids) != e.block_size * n):
            raise ValueError("inconsistent BlockStored")
        return WireBlockStored(
            tuple(hash_from_wire(h) for h in e.block_hashes),
            None if e.parent_block_hash is None else hash_from_wire(e.parent_block_hash),
            tuple(e.token_ids),
            e.block_size,
            e.medium,
            e.lora_name,
            e.lora_id,
            e.group_idx,
            e.kv_cache_spec_kind,
            e.session_id,
        )
    if isinstance(e, BlockRemoved):
        return WireBlockRemoved(tuple(hash_from_wire(h) for h in e.block_hashes), e.medium, e.group_idx)
    return WireAllBlocksCleared()


def decode_event(raw: object) -> WireEvent:
    """One event (tagged map or tagged array); `WireUnknown` when it cannot be read."""
    if isinstance(raw, dict):
        tag, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
        names = _POSITIONAL.get(tag, ())
        fields = dict(zip(names, raw[1:]))
    else:
        return WireUnknown("?", f"an event is a tagged map or array, not {type(raw).__name__}")
    if not isinstance(tag, str):
        return WireUnknown("?", "event without a string 'type'")
    try:
        if tag == "BlockStored":
            return _stored(fields)
        if tag == "BlockRemoved":
            return WireBlockRemoved(_hashes(fields), _opt_str(fields, "medium"), _opt_int(fields, "group_idx"))
        if tag == "AllBlocksCleared":
            return WireAllBlocksCleared()
    except (ValueError, TypeError, KeyError) as exc:
        return WireUnknown(tag, f"malformed {tag}: {exc}")
    return WireUnknown(tag[:64], "unknown event type")


def _stored(f: dict[str, Any]) -> WireBlockStored:
    hashes = _hashes(f)
    parent = f.get("parent_block_hash")
    tokens = f.get("token_ids")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError("token_ids must be a list of ints")
    bs = f.get("block_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise ValueError(f"block_size must be a positive int, not {bs!r}")
    if tokens and len(tokens) != bs * len(hashes):
        raise ValueError(f"{len(tokens)} token ids for {len(hashes)} blocks of {bs}")
    return WireBlockStored(
        hashes,
        None if parent is None else hash_from_wire(parent),
        tuple(tokens),
        bs,
        _opt_str(f, "medium"),
        _opt_str(f, "lora_name"),
        _opt_int(f, "lora_id"),
        _opt_int(f, "group_idx"),
        _opt_str(f, "kv_cache_spec_kind"),
        _opt_str(f, "session_id"),
    )


def _hashes(f: dict[str, Any]) -> tuple[str, ...]:
    hs = f.get("block_hashes")
    if not isinstance(hs, list):
        raise ValueError("block_hashes must be a list")
    return tuple(hash_from_wire(h) for h in hs)


def _opt_str(f: dict[str, Any], key: str) -> str | None:
    v = f.get(key)
    if v is None or isinstance(v, str):
        return v
    raise ValueError(f"{key} must be a string, not {type(v).__name__}")


def _opt_int(f: dict[str, Any], key: str) -> int | None:
    v = f.get(key)
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise ValueError(f"{key} must be an int, not {type(v).__name__}")
