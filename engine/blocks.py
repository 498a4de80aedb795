"""Blocks: the logical index over a session's cache that people look at.

A block is `block_size` consecutive logical tokens. Full blocks get a chain
hash `hash(parent_hash, token_ids)` as vLLM's automatic prefix caching does,
seeded with the model fingerprint so different models never share.
Token states are per layer; a block shows the most common state of its rows.

Knows nothing about mx arrays or models.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import numpy as np

from kvscope.engine.events import BlockHash

DEFAULT_BLOCK_SIZE = 16


class TokenState(IntEnum):
    """What a token's row is in one layer. Values index the window's colour LUT."""

    COMPUTED = 0
    SHARED = 1  # copied in from the prefix store
    MASKED = 2  # stored but invisible to attention
    EVICTED = 3  # dropped by a policy or an edit
    SPLICED = 4  # came from another session or a segment file, repositioned
    QUANTIZED = 5
    ERRATUM = 6  # appended correction
    EMPTY = 7  # past the end of a partial block


N_STATES = len(TokenState)


def chain_hashes(token_ids: list[int] | np.ndarray, block_size: int, root: str) -> list[BlockHash]:
    """Chain hashes of the full blocks of `token_ids`.

    Args:
        token_ids: the token sequence.
        block_size: tokens per block.
        root: seed of the chain (the model fingerprint).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    parent = root.encode()
    out: list[BlockHash] = []
    for b in range(len(ids) // block_size):
        h = hashlib.sha256(parent)
        h.update(ids[b * block_size : (b + 1) * block_size].tobytes())
        digest = h.hexdigest()[:16]
        out.append(BlockHash(digest))
        parent = digest.encode()
    return out


def block_states(token_state: np.ndarray, block_size: int) -> np.ndarray:
    """Most common state per block: `[layers, tokens]` -> `[layers, blocks]` uint8."""
    n_layers, n_tokens = token_state.shape
    n_blocks = -(-n_tokens // block_size)
    padded = np.full((n_layers, n_blocks * block_size), TokenState.EMPTY, np.uint8)
    padded[:, :n_tokens] = token_state
    grouped = padded.reshape(n_layers, n_blocks, block_size)
    counts = np.zeros((n_layers, n_blocks, N_STATES), np.int32)
    for s in range(N_STATES - 1):  # EMPTY never wins over a real row
        counts[..., s] = (grouped == s).sum(axis=2)
    out = counts.argmax(axis=2).astype(np.uint8)
    out[counts.sum(axis=2) == 0] = TokenState.EMPTY
    return out
