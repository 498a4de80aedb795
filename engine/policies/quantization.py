"""KV quantization, simulated honestly: quantize then dequantize in place.

The rows go through `mx.quantize` / `mx.dequantize` (affine, per group of
`group_size` values along head_dim, as mlx-lm's `QuantizedKVCache`), and
the dequantized values are written back, so the cache stays float32 and the
model runs unmodified: attention sees exactly the precision loss a quantized
cache would give. `quantized_nbytes` is what the rows *would* occupy stored
quantized (packed values + one scale and one bias per group).

Knows nothing about sessions or policies' scores.
"""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from kvscope.engine.errors import InvalidRequestError, UnsupportedModelError
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.policies.base import Policy, ScoreInput

BITS = (4, 8)
GROUP_SIZES = (64, 32)  # mlx supports 32/64/128; 64 as mlx-lm's default


def check_bits(bits: Any) -> int:
    if bits not in BITS or isinstance(bits, bool):
        raise InvalidRequestError(f"KV quantization supports {' or '.join(map(str, BITS))} bits, got {bits!r}")
    return int(bits)


def group_size_for(head_dim: int) -> int:
    """The largest mlx group size (<= 64) that divides `head_dim`."""
    for g in GROUP_SIZES:
        if head_dim % g == 0:
            return g
    raise UnsupportedModelError(
        f"KV quantization needs head_dim to be a multiple of 32 (mlx group sizes 32/64); this model has {head_dim}"
    )


def quantize_cache(cache: ScopeKVCache, bits: int) -> int:
    """Round-trip every stored row through `bits`-bit quantization; returns the group size."""
    if cache.keys is None or cache.values is None or cache.n_rows == 0:
        return group_size_for(cache.keys.shape[-1]) if cache.keys is not None else 64
    gk, gv = group_size_for(cache.keys.shape[-1]), group_size_for(cache.values.shape[-1])
    cache.map_rows(lambda k, v: (_round_trip(k, bits, gk), _round_trip(v, bits, gv)))
    mx.eval(cache.keys, cache.values)
    return gk


def _round_trip(x: mx.array, bits: int, group: int) -> mx.array:
    w, scales, biases = mx.quantize(x, group_size=group, bits=bits)
    return mx.dequantize(w, scales, biases, group_size=group, bits=bits).astype(x.dtype)


def quantized_nbytes(cache: ScopeKVCache, bits: int) -> int:
    """Bytes the stored rows would take quantized: packed values + scales/biases."""
    if cache.keys is None or cache.values is None:
        return 0
    total = 0
    for x in (cache.keys, cache.values):
        b, h, _, d = x.shape
        n_values = b * h * cache.n_columns * d  # head-wise: the padded columns are stored too
        n_groups = n_values // group_size_for(d)
        total += n_values * bits // 8 + 2 * n_groups * x.dtype.size
    return total


class Quantize(Policy):
    """Keeps every row; the rows are quantized (`bits` = 8 or 4)."""

    name = "quantize"
    summary = "keep every row, quantize K/V to 8 or 4 bits"
    defaults: ClassVar[dict[str, Any]] = {"bits": 8}
    evicts = False
    reads_head_rows = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_bits(self.params["bits"])

    def score(self, inp: ScoreInput) -> list[np.ndarray]:
        return [np.full((1, len(c)), np.nan, np.float32) for c in inp.candidates]
