"""vLLM's older KV-event encoding (positional arrays, `lora_id`), for the decoder tests of both encodings."""

from __future__ import annotations

import msgspec


class OldEvent(msgspec.Struct, array_like=True, tag=True):
    pass


class OldStored(OldEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class OldRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class OldBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[OldStored | OldRemoved]
    data_parallel_rank: int | None
