"""What a person asks about one block of one layer, as text for the
session view's fixed inspector line (two lines: facts, then the text).

Knows nothing about widgets; reads a `SessionSnapshot`.
"""

from __future__ import annotations

import numpy as np

from kvscope.engine.blocks import TokenState
from kvscope.engine.head_states import head_occupancy
from kvscope.engine.snapshot import SessionSnapshot
from kvscope.ui.palette import state_name


def describe_block(snap: SessionSnapshot | None, layer: int, block: int) -> str:
    """Two lines: where the block is, what it holds and who shares it; then its text."""
    if snap is None or not 0 <= block < snap.n_blocks or not 0 <= layer < snap.n_layers:
        return ""
    lo, hi = snap.block_span(block)
    states = snap.token_state[layer, lo:hi]
    stored = snap.token_state != TokenState.EVICTED
    per_row = snap.nbytes / max(int(stored.sum()), 1)
    h = snap.block_hashes[block]
    shared = ", ".join(snap.block_sessions[block]) or "—"
    score = "—" if snap.scores is None else f"{float(np.mean(snap.scores[layer, lo:hi])):.4g}"
    text = "".join(snap.token_text[lo:hi]).replace("\n", "⏎")
    counts = ", ".join(f"{state_name(s)} {int((states == s).sum())}" for s in np.unique(states))
    first, last = int(snap.positions[lo]), int(snap.positions[hi - 1])
    heads = snap.head_state[layer] if layer < len(snap.head_state) else None
    if heads is not None:  # head-wise compressed layer: each KV head holds its own rows
        held = head_occupancy(heads, lo, hi)
        counts += f" · KV heads hold {', '.join(map(str, held))} of {hi - lo} rows"
    return (
        f"block {block} · layer {layer} · tokens [{lo}, {hi}) · positions {first}–{last} · {counts} · "
        f"{per_row * int(stored[:, lo:hi].sum()) / 1024:.1f} KiB · hash {h or '— (partial/edited)'} · "
        f"shared by {shared} · score {score}"
        + (f" · {snap.layer_notes[layer]}" if layer < len(snap.layer_notes) else "")  # its cache kind
        + f"\n“{text[:200]}”"
    )
