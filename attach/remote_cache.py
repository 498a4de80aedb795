"""RemoteCache: a serving engine's prefix cache, rebuilt from its KV events.

    BlockStored(hashes=[h3, h4], parent=h2, tokens=t3+t4)
        h1 -- h2 -- h3 -- h4          blocks keyed by (group, hash); parent links;
               \\
                h5                     a branch = two children of one block

Promises:
- `apply` takes decoded wire events in stream order and keeps: every cached
  block (hash, parent, token ids, block size, media, LoRA name, group), the
  children of each block, and counters of what happened, including events it
  could not apply (removal of a block it never saw, unknown or malformed
  events) — those are counted, never raised;
- a block stored again (vLLM's `kv_cache_report_mode: full` reports reused
  blocks) is counted as a reuse, not doubled;
- a block lives while it is on at least one medium;
- `content_key` identifies a block by the token ids from the root to its end,
  so engines with different hash schemes (two vLLM processes with different
  seeds, vLLM and kvscope) are compared by what they hold;
- `match(token_ids)` is the cached prefix, in tokens, a request with those
  tokens would hit (walking by token content, as the engine walks by hash);
- what the window asks for at every frame costs no walk over all blocks:
  the leaves, the token count and the branching/reused blocks are kept up
  to date as events apply, and the last `REMOVED_KEPT` removed blocks are
  kept with the (monotonic) time they left, so a view can flash evictions.

Not thread-safe: its owner (`AttachClient`) serialises access.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvscope.attach.child_index import BlockKey, ChildIndex
from kvscope.engine.kv_events import (
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    WireEvent,
    WireUnknown,
)

DEFAULT_MEDIUM = "GPU"  # vLLM's name for its main KV cache, also on its CPU backend
REMOVED_KEPT = 1024  # removed blocks remembered for the view's eviction flash (their times: REMOVED_TIMES_KEPT)
REMOVED_TIMES_KEPT = 1 << 16  # floats, which the garbage collector does not walk: counts past REMOVED_KEPT


@dataclass(slots=True)
class RemoteBlock:
    block_hash: str
    parent: str | None
    token_ids: tuple[int, ...]  # empty when the engine did not send them
    block_size: int
    group: int
    media: tuple[str, ...]  # sorted; a tuple of strings, which the garbage collector stops tracking
    lora_name: str | None
    stored_ts: float
    content_key: str | None  # None: tokens unknown or a parent missing when stored
    order: int = 0  # when it was stored, counted in blocks: later blocks are newer
    reuses: int = 0


@dataclass(slots=True)
class Counters:
    batches: int = 0  # event batches applied (`apply_batch`)
    events: int = 0
    stored_events: int = 0
    removed_events: int = 0
    cleared_events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    reuses: int = 0
    removed_unknown: int = 0  # BlockRemoved for a block never seen (stored before attaching)
    bad_events: Counter[str] = field(default_factory=Counter)  # "type: reason" -> count

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__ if k != "bad_events"}
        out["bad_events"] = dict(self.bad_events)
        out["bad_events_total"] = sum(self.bad_events.values())
        return out


class RemoteCache:
    """The prefix tree of one remote engine (one data-parallel rank)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._blocks: dict[BlockKey, RemoteBlock] = {}
        self._children = ChildIndex()  # (group, parent hash or "") -> child hashes
        self._by_content: dict[tuple[int, str | None, tuple[int, ...]], str] = {}  # (group, parent, tokens) -> hash
        self._leaves: set[BlockKey] = set()  # cached blocks without children
        self._branchy: set[BlockKey] = set()  # reused or branching blocks: the candidates for `hot`
        self._n_tokens = 0
        self._order = 0
        # two deques, not one of (time, block) pairs: a pair per block would be one more object for the
        # garbage collector to walk (its full passes stop every thread, the window's included)
        self._removed: deque[RemoteBlock] = deque(maxlen=REMOVED_KEPT)
        self._removed_at: deque[float] = deque(maxlen=REMOVED_TIMES_KEPT)
        self._clock = clock
        self.block_size: int | None = None
        self.counters = Counters()

    # ------------------------------------------------------------ changes
    def apply(self, event: WireEvent, ts: float = 0.0) -> None:
        c = self.counters
        c.events += 1
        if isinstance(event, WireBlockStored):
            c.stored_events += 1
            self._store(event, ts)
        elif isinstance(event, WireBlockRemoved):
            c.removed_events += 1
            self._remove(event)
        elif isinstance(event, WireAllBlocksCleared):
            c.cleared_events += 1
            self.clear()
        elif isinstance(event, WireUnknown):
            c.bad_events[f"{event.type_name}: {event.reason}"] += 1

    def apply_all(self, events: Iterable[WireEvent], ts: float = 0.0) -> None:
        for e in events:
            self.apply(e, ts)

    def apply_batch(self, events: Iterable[WireEvent], ts: float = 0.0) -> None:
        """One batch off the wire, counted as one."""
        self.apply_all(events, ts)
        self.counters.batches += 1

    def clear(self) -> None:
        """Forget every block (AllBlocksCleared, a new publisher epoch): nothing flashes."""
        self._blocks.clear()
        self._children.clear()
        self._by_content.clear()
        self._leaves.clear()
        self._branchy.clear()
        self._removed.clear()
        self._removed_at.clear()
        self._n_tokens = 0

    def _store(self, e: WireBlockStored, ts: float) -> None:
        group = e.group_idx or 0
        medium = e.medium or DEFAULT_MEDIUM
        self.block_size = e.block_size
        parent = e.parent_block_hash
        bs = e.block_size
        for i, h in enumerate(e.block_hashes):
            key = (group, h)
            toks = e.token_ids[i * bs : (i + 1) * bs] if e.token_ids else ()
            b = self._blocks.get(key)
            if b is not None:
                b.reuses += 1
                if medium not in b.media:
                    b.media = tuple(sorted((*b.media, medium)))
                self._branchy.add(key)
                self.counters.reuses += 1
            else:
                self._order += 1
                self._blocks[key] = RemoteBlock(
                    h,
                    parent,
                    toks,
                    bs,
                    group,
                    (medium,),
                    e.lora_name,
                    ts,
                    self._content_key(group, parent, toks),
                    self._order,
                )
                self._link(key, parent)
                if toks:
                    self._by_content[(group, parent, toks)] = h
                self._n_tokens += bs
                self.counters.blocks_stored += 1
            parent = h

    def _link(self, key: BlockKey, parent: str | None) -> None:
        group, h = key
        n_siblings = self._children.add((group, parent or ""), h)
        if parent is not None and (group, parent) in self._blocks:
            self._leaves.discard((group, parent))
            if n_siblings > 1:
                self._branchy.add((group, parent))
        n_kids = self._children.count(key)  # children stored while it was away keep it inner
        if not n_kids:
            self._leaves.add(key)
        elif n_kids > 1:
            self._branchy.add(key)

    def _content_key(self, group: int, parent: str | None, toks: tuple[int, ...]) -> str | None:
        if not toks:
            return None
        if parent is None:
            base = b""
        else:
            p = self._blocks.get((group, parent))
            if p is None or p.content_key is None:
                return None
            base = p.content_key.encode()
        h = hashlib.blake2b(base, digest_size=12)
        h.update(array("q", toks).tobytes())
        return h.hexdigest()

    def _remove(self, e: WireBlockRemoved) -> None:
        group = e.group_idx or 0
        for h in e.block_hashes:
            key = (group, h)
            b = self._blocks.get(key)
            if b is None:
                self.counters.removed_unknown += 1
                continue
            if e.medium is not None:
                left = tuple(m for m in b.media if m != e.medium)
                if left:
                    b.media = left
                    continue  # still held on another medium
            # a removed block keeps the media it was removed from (the view says where it was)
            del self._blocks[key]
            self._unlink(key, b)
            if b.token_ids and self._by_content.get((group, b.parent, b.token_ids)) == h:
                del self._by_content[(group, b.parent, b.token_ids)]
            self._n_tokens -= b.block_size
            self._removed.append(b)
            self._removed_at.append(self._clock())
            self.counters.blocks_removed += 1

    def _unlink(self, key: BlockKey, b: RemoteBlock) -> None:
        self._leaves.discard(key)
        self._branchy.discard(key)
        pkey = (b.group, b.parent or "")
        n = self._children.discard(pkey, b.block_hash)
        p = self._blocks.get(pkey) if b.parent is not None else None
        if p is not None:
            if n == 0:
                self._leaves.add(pkey)
            if n <= 1 and not p.reuses:
                self._branchy.discard(pkey)

    # ------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, h: str, group: int = 0) -> RemoteBlock | None:
        return self._blocks.get((group, h))

    def blocks(self) -> list[RemoteBlock]:
        return list(self._blocks.values())

    def children(self, h: str | None, group: int = 0) -> list[str]:
        return sorted(self._children.of((group, h or "")))

    def n_tokens(self) -> int:
        return self._n_tokens

    def roots(self) -> list[RemoteBlock]:
        """Blocks whose parent is not cached: the first block of a prompt, or an orphan."""
        return [b for b in self._blocks.values() if b.parent is None or (b.group, b.parent) not in self._blocks]

    def leaves(self) -> list[RemoteBlock]:
        """Cached blocks without cached children, oldest first."""
        return sorted((self._blocks[k] for k in self._leaves), key=lambda b: b.order)

    def is_leaf(self, group: int, h: str) -> bool:
        return (group, h) in self._leaves

    def n_leaves(self) -> int:
        return len(self._leaves)

    def newest_leaves(self, n: int) -> list[RemoteBlock]:
        """The `n` most recently stored leaves: the chains a view draws first."""
        return heapq.nlargest(n, (self._blocks[k] for k in self._leaves), key=lambda b: b.order)

    def n_removed_since(self, t: float) -> int:
        """Blocks removed at or after `t` (the cache's clock, `time.monotonic` by default; counted up to 65,536)."""
        n = 0
        for when in reversed(self._removed_at):
            if when < t:
                break
            n += 1
        return n

    def removed_since(self, t: float) -> list[RemoteBlock]:
        """The blocks removed at or after `t`, oldest first (the last REMOVED_KEPT at most)."""
        n = min(self.n_removed_since(t), len(self._removed))
        return list(itertools.islice(self._removed, len(self._removed) - n, None))

    def find_removed(self, h: str, group: int = 0) -> RemoteBlock | None:
        """The block most recently removed under hash `h`, while it is remembered."""
        return next((b for b in reversed(self._removed) if b.block_hash == h and b.group == group), None)

    def now(self) -> float:
        return self._clock()

    def chain(self, leaf: RemoteBlock) -> list[RemoteBlock]:
        """Root-first blocks from the first cached ancestor down to `leaf`."""
        out = [leaf]
        seen = {leaf.block_hash}
        b = leaf
        while b.parent is not None:
            p = self._blocks.get((b.group, b.parent))
            if p is None or p.block_hash in seen:
                break
            seen.add(p.block_hash)
            out.append(p)
            b = p
        out.reverse()
        return out

    def chains(self, limit: int | None = None) -> list[list[RemoteBlock]]:
        """One root-to-leaf chain per leaf, longest first (of the `limit` newest leaves only)."""
        leaves = self.leaves() if limit is None else self.newest_leaves(limit)
        return sorted((self.chain(leaf) for leaf in leaves), key=lambda c: (-len(c), c[0].stored_ts, c[-1].order))

    def n_children(self, b: RemoteBlock) -> int:
        return self._children.count((b.group, b.block_hash))

    def match(self, token_ids: list[int] | tuple[int, ...], group: int = 0) -> int:
        """Tokens of `token_ids` a request would find cached (full blocks, by content)."""
        bs = self.block_size
        if not bs:
            return 0
        parent: str | None = None
        n = 0
        for i in range(len(token_ids) // bs):
            h = self._by_content.get((group, parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if h is None:
                break
            parent = h
            n += bs
        return n

    def content_keys(self) -> set[str]:
        return {b.content_key for b in self._blocks.values() if b.content_key}

    def hot(self, n: int = 5) -> list[RemoteBlock]:
        """The most reused blocks (reported again by the engine), then the most shared."""

        candidates = (self._blocks[k] for k in self._branchy)
        ranked = heapq.nsmallest(n, candidates, key=lambda b: (-b.reuses, -self.n_children(b), b.stored_ts, b.order))
        return [b for b in ranked if b.reuses or self.n_children(b) > 1]

    # ------------------------------------------------------------ output
    def summary(self) -> str:
        c = self.counters
        bad = sum(c.bad_events.values())
        return (
            f"{len(self._blocks)} blocks ({self.n_tokens()} tokens) in {len(self._leaves)} chains; "
            f"stored {c.blocks_stored} removed {c.blocks_removed} reused {c.reuses} cleared {c.cleared_events}"
            + (f"; unknown removals {c.removed_unknown}" if c.removed_unknown else "")
            + (f"; bad events {bad}" if bad else "")
        )

    def to_json(self, decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
        """Every block (parents first within a chain), the chains, the hot blocks and the counters."""
        blocks = []
        for b in sorted(self._blocks.values(), key=lambda b: b.stored_ts):
            d: dict[str, Any] = {
                "hash": b.block_hash,
                "parent": b.parent,
                "group": b.group,
                "block_size": b.block_size,
                "token_ids": list(b.token_ids),
                "media": list(b.media),
                "lora_name": b.lora_name,
                "reuses": b.reuses,
                "content_key": b.content_key,
            }
            if decode is not None and b.token_ids:
                d["text"] = decode(list(b.token_ids))
            blocks.append(d)
        return {
            "block_size": self.block_size,
            "n_blocks": len(self._blocks),
            "n_tokens": self.n_tokens(),
            "blocks": blocks,
            "chains": [[b.block_hash for b in ch] for ch in self.chains()],
            "hot": [
                {"hash": b.block_hash, "reuses": b.reuses, "children": self.n_children(b)}
                | ({"text": decode(list(b.token_ids))} if decode is not None and b.token_ids else {})
                for b in self.hot()
            ],
            "counters": self.counters.as_dict(),
        }
