"""The block model's bookkeeping and the grid the window draws, without Qt or sockets.

The oracle for the incremental bookkeeping is a recompute from the blocks
themselves; the grid is checked for what a person sees: rows, colours,
evictions flashing where they were and going, and caps that say what they
leave out.
"""

from __future__ import annotations

import random

from kvscope.attach import RemoteCache
from kvscope.attach.chain_grid import build_grid, cell_detail
from kvscope.attach.client import AttachClient, Progress
from kvscope.attach.subscriber import Received, StreamStats
from kvscope.engine.blocks import TokenState
from kvscope.engine.kv_events import WireAllBlocksCleared, WireBatch, WireBlockRemoved, WireBlockStored

BS = 4
C, S, E, X = TokenState.COMPUTED, TokenState.SHARED, TokenState.EVICTED, TokenState.EMPTY


def h(i: int) -> str:
    return f"{i:016x}"


def stored(i: int, parent: int | None = None, medium: str = "GPU") -> WireBlockStored:
    return WireBlockStored(
        (h(i),), None if parent is None else h(parent), tuple(range(i * BS, (i + 1) * BS)), BS, medium
    )


def removed(*ids: int, medium: str | None = "GPU") -> WireBlockRemoved:
    return WireBlockRemoved(tuple(h(i) for i in ids), medium)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def recomputed(cache: RemoteCache) -> tuple[set[str], int, list[str]]:
    """Leaves, tokens and hot blocks from a walk over every block: what the cache keeps up to date."""
    blocks = cache.blocks()
    kids: dict[str, int] = {}
    for b in blocks:
        if b.parent is not None:
            kids[b.parent] = kids.get(b.parent, 0) + 1
    orphans_under = {b.block_hash for b in blocks if kids.get(b.block_hash)}
    leaves = {b.block_hash for b in blocks if b.block_hash not in orphans_under}
    ranked = sorted(blocks, key=lambda b: (-b.reuses, -kids.get(b.block_hash, 0), b.stored_ts, b.order))
    hot = [b.block_hash for b in ranked if b.reuses or kids.get(b.block_hash, 0) > 1][:5]
    return leaves, sum(b.block_size for b in blocks), hot


def test_incremental_leaves_tokens_and_hot_match_a_full_recompute() -> None:
    rng = random.Random(7)
    cache = RemoteCache()
    live: list[int] = []
    for step in range(3000):
        r = rng.random()
        if r < 0.55 or not live:  # a new block under a random cached block (or a root), or a stored-again one
            i = rng.randrange(1, 400)
            parent = rng.choice(live) if live and rng.random() < 0.8 else None
            cache.apply(stored(i, parent if parent != i else None))
            live.append(i)
        elif r < 0.95:  # evict one, sometimes from another medium only
            cache.apply(removed(rng.choice(live), medium=rng.choice(["GPU", "GPU", "CPU", None])))
        elif r < 0.99:  # reuse: the same block reported again
            cache.apply(stored(rng.choice(live)))
        else:
            cache.apply(WireAllBlocksCleared())
        live = [b for b in live if cache.get(h(b)) is not None]
        if step % 50 == 0 or step > 2950:
            leaves, n_tokens, hot = recomputed(cache)
            assert {b.block_hash for b in cache.leaves()} == leaves
            assert cache.n_leaves() == len(leaves) and cache.n_tokens() == n_tokens
            assert [b.block_hash for b in cache.hot(5)] == hot


def tree(cache: RemoteCache) -> None:
    """Blocks 1-2 shared by two chains (3-4 and 5), and a chain of its own (7-8)."""
    for ev in (stored(1), stored(2, 1), stored(3, 2), stored(4, 3), stored(5, 2), stored(7), stored(8, 7)):
        cache.apply(ev)


def test_grid_rows_colours_and_a_chain_evicted_tail_first_flashes_then_goes() -> None:
    clock = Clock()
    cache = RemoteCache(clock=clock)
    tree(cache)
    grid = build_grid(cache, StreamStats(), flash_s=1.5)
    # rows in store order: chains with a common prefix sit together
    assert grid.rows == ((h(1), h(2), h(3), h(4)), (h(1), h(2), h(5)), (h(7), h(8)))
    assert grid.states.tolist() == [[S, S, C, C], [S, S, C, X], [C, C, X, X]]
    assert grid.n_flashing == 0 and grid.rows_left_out == 0

    clock.t += 0.5
    cache.apply(removed(4))  # vLLM frees a request's blocks tail first
    cache.apply(removed(3))
    grid = build_grid(cache, StreamStats(), flash_s=1.5)
    # the evicted tail is drawn red where it was, under its cached head; no row of its own for block 2
    assert grid.rows == ((h(1), h(2), h(3), h(4)), (h(1), h(2), h(5)), (h(7), h(8)))
    assert grid.states.tolist() == [[C, C, E, E], [C, C, C, X], [C, C, X, X]]  # 1-2 no longer branch
    assert grid.n_flashing == 2 and grid.flash_left_out == 0
    info = cell_detail(cache, StreamStats(), 0, grid.rows[0][:4], int(grid.states[0, 3]))
    assert info is not None and info.evicted and info.token_ids == tuple(range(16, 20))
    assert info.before == tuple(range(4, 16))  # the blocks above it: 1, 2 (cached), 3 (removed, remembered)

    clock.t += 1.6  # the flash is over
    grid = build_grid(cache, StreamStats(), flash_s=1.5)
    assert grid.rows == ((h(1), h(2), h(5)), (h(7), h(8)))
    assert grid.states.tolist() == [[C, C, C], [C, C, X]]
    assert grid.n_flashing == 0


def test_a_removal_from_another_medium_or_a_clear_does_not_flash() -> None:
    clock = Clock()
    cache = RemoteCache(clock=clock)
    cache.apply(stored(1))
    cache.apply(stored(1, medium="CPU"))  # offloaded copy
    cache.apply(removed(1, medium="CPU"))  # still on the GPU
    assert build_grid(cache, StreamStats()).n_flashing == 0 and len(cache) == 1
    tree(cache)
    cache.apply(WireAllBlocksCleared())  # /reset_prefix_cache: the view empties at once
    grid = build_grid(cache, StreamStats())
    assert grid.states.size == 0 and grid.n_flashing == 0 and grid.rows_left_out == 0


def test_caps_say_what_they_leave_out() -> None:
    clock = Clock()
    cache = RemoteCache(clock=clock)
    for i in range(1, 11):  # ten chains of 6 blocks
        base = i * 100
        cache.apply(stored(base))
        for j in range(1, 6):
            cache.apply(stored(base + j, base + j - 1))
    grid = build_grid(cache, StreamStats(), max_rows=4, max_cols=3)
    assert grid.states.shape == (4, 3)
    assert grid.rows_left_out == 6 and grid.cols_left_out == 4 * 3
    assert [r[0] for r in grid.rows] == [h(700), h(800), h(900), h(1000)]  # the newest chains
    for i in range(1, 11):
        cache.apply(removed(*(i * 100 + j for j in range(5, -1, -1))))
    grid = build_grid(cache, StreamStats(), max_rows=4, max_cols=3)
    assert grid.states.shape == (2, 3)  # evictions get half the rows at most, from the newest 4 x rows removals
    assert [r[0] for r in grid.rows] == [h(900), h(1000)]
    assert grid.n_flashing == 2 * 3 and grid.flash_left_out == 60 - 6  # every removed block not drawn, counted
    assert grid.rows_left_out == 1  # chain 8's head, among the removals looked at


def batch(seq: int, *events: object) -> Received:
    return Received(WireBatch(seq, "kv", 0.0, 0, tuple(events)))  # type: ignore[arg-type]


def test_the_receive_thread_lets_a_waiting_reader_in_after_each_batch() -> None:
    client = AttachClient("tcp://127.0.0.1:*", bind=True)
    try:
        client.close()  # its thread stopped: the test drives the slices itself
        got = [batch(i, stored(i + 1)) for i in range(10)]
        assert client._apply_slice(got, 0) == 10  # nobody waits: one slice applies them all (within SLICE_S)
        client._cache.clear()
        client._waiting = 1  # a reader is at the lock
        assert client._apply_slice(got, 0) == 1 and client._apply_slice(got, 1) == 2
        assert client.progress == Progress(batches=12, events=12, blocks_stored=12, blocks_removed=0)
    finally:
        client._waiting = 0
