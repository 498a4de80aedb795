"""Several attached engines side by side: what they hold in common, who would hit.

Engines are compared by block content (`RemoteBlock.content_key`: the token
ids from the root to the block's end), not by hash, since two vLLM processes
(or vLLM and kvscope) hash the same tokens differently.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvscope.attach.client import AttachClient


def common_content(clients: Sequence[AttachClient]) -> set[str]:
    """Content keys of the blocks every engine holds."""
    sets = [c.read(lambda cache, _s: cache.content_keys()) for c in clients]
    return set.intersection(*sets) if sets else set()


def prefix_hits(clients: Sequence[AttachClient], token_ids: Sequence[int]) -> list[tuple[str, int]]:
    """(engine, cached prefix in tokens) for a prompt, best engine first: a KV-aware router's question."""
    toks = tuple(token_ids)
    hits = [(c.name, c.read(lambda cache, _s: cache.match(toks))) for c in clients]
    return sorted(hits, key=lambda x: -x[1])
