"""`EngineConfig`: what an Engine is built with (block size, budgets, persistence, event publishing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.engine.blocks import DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    prefill_chunk: int = 512
    prefix_budget_bytes: int = 1 << 30
    memory_budget_bytes: int | None = None  # None: half of physical memory
    persist: bool = False  # save sessions after every turn / edit and reopen them
    data_dir: str | None = None  # None: KVSCOPE_HOME or the platform's user data folder
    kv_events: str | None = None  # publish block events in vLLM's format to this ZMQ endpoint
    kv_events_replay: str | None = None  # ZMQ ROUTER endpoint for replay requests
    kv_events_topic: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
