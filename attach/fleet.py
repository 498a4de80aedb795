"""Several attached engines side by side: what they hold in common, who would hit.

`prompt_tokens` turns a prompt into the token ids a chat server sees, for the
"who would hit" question. The clients are `AttachClient`s or
`AttachProcess`es: their reads are module-level functions, which pickle.

Engines are compared by block content (`RemoteBlock.content_key`: the token
ids from the root to the block's end), not by hash, since two vLLM processes
(or vLLM and kvscope) hash the same tokens differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from kvscope.attach.remote_cache import RemoteCache
from kvscope.attach.subscriber import StreamStats

T = TypeVar("T")


class Engine(Protocol):
    """What fleet and the window need of a followed engine (AttachClient, AttachProcess)."""

    name: str

    def read(self, fn: Callable[[RemoteCache, StreamStats], T]) -> T: ...


def content_keys(cache: RemoteCache, _stats: StreamStats) -> set[str]:
    return cache.content_keys()


def cached_prefix(cache: RemoteCache, _stats: StreamStats, token_ids: tuple[int, ...] = ()) -> int:
    """Tokens of `token_ids` the engine holds (`partial(cached_prefix, token_ids=...)` for `read`)."""
    return cache.match(token_ids)


def common_content(clients: Sequence[Engine]) -> set[str]:
    """Content keys of the blocks every engine holds."""
    sets = [c.read(content_keys) for c in clients]
    return set.intersection(*sets) if sets else set()


def prefix_hits(clients: Sequence[Engine], token_ids: Sequence[int]) -> list[tuple[str, int]]:
    """(engine, cached prefix in tokens) for a prompt, best engine first: a KV-aware router's question."""
    ask = partial(cached_prefix, token_ids=tuple(token_ids))
    hits = [(c.name, c.read(ask)) for c in clients]
    return sorted(hits, key=lambda x: -x[1])


def prompt_tokens(tokenizer: Any, text: str) -> list[int]:
    """The token ids a chat server would see for `text`.

    A JSON list of {"role", "content"} messages, or plain text taken as one
    user message, goes through the tokenizer's chat template with the
    generation prompt (as /v1/chat/completions does); without a template the
    text is encoded as it is.
    """
    messages: Any = None
    if text.lstrip().startswith("["):
        try:
            messages = json.loads(text)
        except ValueError:
            messages = None
    ok = isinstance(messages, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    if not ok:
        messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(text))
