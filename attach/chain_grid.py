"""ChainGrid: a RemoteCache laid out as rows of blocks for the window to draw.

    row 0  [s1][s2][a3][a4]        one row per leaf: its chain from the root;
    row 1  [s1][s2][b3]            rows sorted by their blocks' store order, so
    row 2  [s1][s2][c3][x4][x5]    chains with a common prefix sit together
    row 3  [r1][r2]

    s = SHARED (a block at or below it branches: several chains hold it)
    a, b, r = COMPUTED (one chain);  x = EVICTED (removed less than `flash_s` ago)

Promises:
- bounded work per grid, whatever the cache holds: at most `max_rows` rows
  (the newest chains, the ones that are changing) of at most `max_cols`
  blocks, found without walking every block (the cache keeps its leaves);
  what is left out is counted (`rows_left_out`, `cols_left_out`,
  `flash_left_out`) for the view to say so;
- blocks removed in the last `flash_s` seconds are drawn EVICTED where they
  were: under the blocks of their chain that are still cached (a chain
  evicted tail first shows its cached head and its red tail), in rows of
  their own, up to half the rows, from the newest `4 * max_rows` removals
  (a view redraws while any flash, so they go when their time is up even
  if nothing else arrives);
- small plain data (a uint8 array, the drawn blocks' hashes, counters; no
  references into the cache), so a grid pickles fast from the attach
  process to the window's; what a hovered block holds (tokens, media,
  reuses) is asked for when it is hovered (`cell_detail`).
Colours are the window's TokenState values, so the legend holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvscope.attach.remote_cache import BlockKey, RemoteBlock, RemoteCache
from kvscope.attach.subscriber import StreamStats
from kvscope.engine.blocks import TokenState

FLASH_S = 1.5  # how long a removed block stays on the map, in red


@dataclass(frozen=True)
class CellInfo:
    block_hash: str
    parent: str | None
    token_ids: tuple[int, ...]
    media: tuple[str, ...]
    reuses: int
    shared: bool  # in more than one chain (a prefix several requests hold)
    evicted: bool  # removed from the engine (drawn red while it flashes)
    before: tuple[int, ...] = ()  # token ids of the blocks above it on its row (that the cache still knows)


@dataclass(frozen=True)
class ChainGrid:
    states: np.ndarray  # [rows, cols] uint8 TokenState
    rows: tuple[tuple[str, ...], ...]  # per row, the hashes of the blocks drawn, root first
    row_groups: tuple[int, ...]  # the KV cache group of each row
    n_blocks: int
    n_tokens: int
    block_size: int
    rows_left_out: int
    batches: int  # batches applied to the cache when the grid was built
    summary: str
    stream: dict[str, int | str]
    blocks_stored: int
    blocks_removed: int
    hot: tuple[tuple[str, int, int], ...] = ()  # (hash prefix, reuses, children) of the hottest blocks
    cols_left_out: int = 0  # blocks past `max_cols` in the rows drawn
    n_flashing: int = 0  # removed blocks drawn EVICTED
    flash_left_out: int = 0  # blocks removed within `flash_s` not drawn

    def has_cell(self, row: int, col: int) -> bool:
        return 0 <= row < len(self.rows) and 0 <= col < len(self.rows[row])


Row = tuple[list[RemoteBlock], int]  # blocks root first, how many of them (from the root) are cached


def _ghost_rows(cache: RemoteCache, since: float, limit: int) -> tuple[list[Row], set[BlockKey]]:
    """Rows ending in the newest `limit` blocks removed since `since`; the cached blocks they hang under."""
    ghosts: dict[BlockKey, RemoteBlock] = {}
    for b in cache.removed_since(since)[-limit:]:  # a block stored again since is cached, not a ghost
        if cache.get(b.block_hash, b.group) is None:
            ghosts[(b.group, b.block_hash)] = b
    has_ghost_child = {(g.group, g.parent) for g in ghosts.values() if g.parent is not None}
    rows: list[Row] = []
    for key, g in ghosts.items():
        if key in has_ghost_child:
            continue  # drawn in the row of its removed child
        tail, seen = [g], {key}
        while tail[-1].parent is not None and (g.group, tail[-1].parent) in ghosts:
            up = ghosts[(g.group, tail[-1].parent)]
            if (up.group, up.block_hash) in seen:
                break
            seen.add((up.group, up.block_hash))
            tail.append(up)
        tail.reverse()
        head = cache.get(tail[0].parent, g.group) if tail[0].parent is not None else None
        live = cache.chain(head) if head is not None else []
        rows.append((live + tail, len(live)))
    return rows, has_ghost_child


def build_grid(
    cache: RemoteCache,
    stats: StreamStats,
    max_rows: int = 256,
    max_cols: int = 1024,
    flash_s: float = FLASH_S,
) -> ChainGrid:
    since = cache.now() - flash_s
    ghost_rows, covered = _ghost_rows(cache, since, 4 * max_rows) if flash_s > 0 else ([], set())
    ghost_rows.sort(key=lambda r: -r[0][-1].order)
    n_ghost_rows = len(ghost_rows)
    ghost_rows = ghost_rows[: max_rows // 2]
    # a cached leaf whose removed child is drawn is in that row already
    covered = {k for k in covered if cache.is_leaf(*k)}
    newest = cache.newest_leaves(max_rows - len(ghost_rows) + len(covered))
    live_rows: list[Row] = []
    for b in newest:
        if (b.group, b.block_hash) not in covered and len(live_rows) < max_rows - len(ghost_rows):
            chain = cache.chain(b)
            live_rows.append((chain, len(chain)))
    shown = sorted(ghost_rows + live_rows, key=lambda r: [b.order for b in r[0]])
    cols = min(max((len(r) for r, _ in shown), default=0), max_cols)
    states = np.full((len(shown), cols), TokenState.EMPTY, np.uint8)
    n_flashing = cols_left_out = 0
    for r, (row, n_live) in enumerate(shown):
        n = min(len(row), cols)
        cols_left_out += len(row) - n
        # a block is in several chains iff a cached block at or below it on this chain branches
        last_branch = next((i for i in range(min(n_live, n) - 1, -1, -1) if cache.n_children(row[i]) > 1), -1)
        states[r, : min(n_live, n)] = TokenState.COMPUTED
        states[r, : last_branch + 1] = TokenState.SHARED
        states[r, n_live:n] = TokenState.EVICTED
        n_flashing += max(n - n_live, 0)
    return ChainGrid(
        states,
        tuple(tuple(b.block_hash for b in row[:cols]) for row, _ in shown),
        tuple(row[-1].group for row, _ in shown),
        len(cache),
        cache.n_tokens(),
        cache.block_size or 0,
        cache.n_leaves() - len(covered) - len(live_rows) + n_ghost_rows - len(ghost_rows),
        cache.counters.batches,
        cache.summary(),
        stats.as_dict(),
        cache.counters.blocks_stored,
        cache.counters.blocks_removed,
        tuple((b.block_hash[:8], b.reuses, cache.n_children(b)) for b in cache.hot(3)),
        cols_left_out,
        n_flashing,
        max(cache.n_removed_since(since) - n_flashing, 0) if flash_s > 0 else 0,
    )


def view_grid(cache: RemoteCache, stats: StreamStats, flash_s: float = FLASH_S) -> ChainGrid:
    """`build_grid` with the view's caps: a module-level function, so it can be sent to an attach process."""
    return build_grid(cache, stats, flash_s=flash_s)


def cell_detail(
    cache: RemoteCache, _stats: StreamStats, group: int = 0, hashes: tuple[str, ...] = (), state: int = 0
) -> CellInfo | None:
    """What the last of `hashes` (a row of a grid, root first) holds, with the tokens above it; None if unknown."""
    if not hashes:
        return None
    b = cache.get(hashes[-1], group) or cache.find_removed(hashes[-1], group)
    if b is None:
        return None
    before: list[int] = []
    for h in hashes[-4:-1]:  # the context shown before it: the last blocks above
        up = cache.get(h, group) or cache.find_removed(h, group)
        before.extend(up.token_ids if up is not None else ())
    evicted = cache.get(b.block_hash, group) is not b
    shared = state == TokenState.SHARED
    return CellInfo(b.block_hash, b.parent, b.token_ids, b.media, b.reuses, shared, evicted, tuple(before))
