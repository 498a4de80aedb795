"""`EngineConfig`: what an Engine is built with (block size, budgets, persistence, event publishing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.engine.blocks import DEFAULT_BLOCK_SIZE
from kvscope.engine.errors import InvalidRequestError
from kvscope.engine.prefix_policy import POLICIES


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    prefill_chunk: int = 512
    prefix_budget_bytes: int = 1 << 30
    prefix_policy: str = "lru"  # prefix-store eviction: lru, hot, workflow (engine/prefix_policy.py)
    memory_budget_bytes: int | None = None  # None: half of physical memory
    persist: bool = False  # save sessions after every turn / edit and reopen them
    data_dir: str | None = None  # None: KVSCOPE_HOME or the platform's user data folder
    kv_events: str | None = None  # publish block events in vLLM's format to this ZMQ endpoint
    kv_events_replay: str | None = None  # ZMQ ROUTER endpoint for replay requests
    kv_events_topic: str = ""

    def __post_init__(self) -> None:
        if self.prefix_policy not in POLICIES:
            raise InvalidRequestError(
                f"unknown prefix-store policy {self.prefix_policy!r}; choose from {', '.join(POLICIES)}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
