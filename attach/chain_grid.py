"""ChainGrid: a RemoteCache laid out as rows of blocks for the window to draw.

    row 0  [r1][b2][b3][b4]        one row per leaf: its chain from the root
    row 1  [r1][b2][c3]            blocks in more than one row are SHARED (a prefix
    row 2  [x1][x2]                several requests hit), the rest COMPUTED

Promises: plain numpy and strings (no references into the cache), built in
one pass under the client's lock, in time linear in the blocks plus the
drawn cells; at most `max_rows` rows (the deepest chains first) and
`max_cols` blocks per row, and says how many chains it left out.
Colours are the window's TokenState values, so the legend holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvscope.attach.remote_cache import RemoteCache
from kvscope.attach.subscriber import StreamStats
from kvscope.engine.blocks import TokenState


@dataclass(frozen=True)
class CellInfo:
    block_hash: str
    parent: str | None
    token_ids: tuple[int, ...]
    media: tuple[str, ...]
    reuses: int
    shared: bool  # in more than one chain (a prefix several requests hold)


@dataclass(frozen=True)
class ChainGrid:
    states: np.ndarray  # [rows, cols] uint8 TokenState
    cells: tuple[tuple[CellInfo, ...], ...]  # per row, per block
    n_blocks: int
    n_tokens: int
    block_size: int
    rows_left_out: int
    summary: str
    stream: dict[str, int | str]
    blocks_stored: int
    blocks_removed: int
    hot: tuple[tuple[str, int, int], ...] = ()  # (hash prefix, reuses, children) of the hottest blocks

    def cell(self, row: int, col: int) -> CellInfo | None:
        if 0 <= row < len(self.cells) and 0 <= col < len(self.cells[row]):
            return self.cells[row][col]
        return None

    def chain_tokens(self, row: int, col: int) -> list[int]:
        """Token ids from the root of `row` through block `col`."""
        return [t for c in self.cells[row][: col + 1] for t in c.token_ids] if self.cell(row, col) else []


def build_grid(cache: RemoteCache, stats: StreamStats, max_rows: int = 256, max_cols: int = 4096) -> ChainGrid:
    n_chains = len(cache.leaves())
    shown = cache.chains(limit=max_rows)
    cols = min(max((len(c) for c in shown), default=0), max_cols)
    states = np.full((len(shown), cols), TokenState.EMPTY, np.uint8)
    cells: list[tuple[CellInfo, ...]] = []
    for r, ch in enumerate(shown):
        # A block is in several chains iff a block at or below it on this chain branches.
        shared = [False] * len(ch)
        below = False
        for i in range(len(ch) - 1, -1, -1):
            below = below or cache.n_children(ch[i]) > 1
            shared[i] = below
        row = []
        for c, b in enumerate(ch[:cols]):
            states[r, c] = TokenState.SHARED if shared[c] else TokenState.COMPUTED
            row.append(CellInfo(b.block_hash, b.parent, b.token_ids, tuple(sorted(b.media)), b.reuses, shared[c]))
        cells.append(tuple(row))
    return ChainGrid(
        states,
        tuple(cells),
        len(cache),
        cache.n_tokens(),
        cache.block_size or 0,
        n_chains - len(shown),
        cache.summary(),
        stats.as_dict(),
        cache.counters.blocks_stored,
        cache.counters.blocks_removed,
        tuple((b.block_hash[:8], b.reuses, cache.n_children(b)) for b in cache.hot(3)),
    )
