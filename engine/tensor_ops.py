"""The few tensor slicing helpers every cache operation shares.

Layout everywhere: `[batch, kv_heads, rows, head_dim]`, rows on axis 2.
Knows nothing about sessions, blocks or models.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

ROW_AXIS = 2


def take_rows(x: mx.array, rows: mx.array) -> mx.array:
    """Gather rows (axis 2) of a `[B, H, rows, D]` tensor."""
    return mx.take(x, rows, axis=ROW_AXIS)


def slice_rows(x: mx.array, lo: int, hi: int) -> mx.array:
    """Rows [lo, hi) as a fresh contiguous array (safe to keep after `x` changes)."""
    return mx.contiguous(x[..., lo:hi, :])


def concat_rows(parts: list[mx.array]) -> mx.array:
    """Concatenate `[B, H, n_i, D]` tensors along the row axis."""
    return mx.concatenate(parts, axis=ROW_AXIS)


def to_numpy(x: mx.array, dtype: mx.Dtype | None = None) -> np.ndarray:
    """A C-contiguous numpy copy; mx.take can yield strided layouts and safetensors writes raw memory."""
    return np.ascontiguousarray(np.array(x if dtype is None else x.astype(dtype)))
