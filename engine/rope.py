"""Reposition keys: rotate keys stored at position p so they sit at p + delta.

RoPE is a rotation per frequency pair, so R(p + d) = R(d) R(p) whenever the
frequencies are fixed and nothing rescales the magnitude (nn.RoPE with any
`scale`, Llama3RoPE; `RopeInfo.composable` says which). The cos/sin of
R(d) are read off the model's *own* RoPE module by rotating a probe vector,
so frequencies, scaling, partial rotary dims and the traditional/rotate-half
layout all come from the model; negative deltas use the inverse rotation.

Values are never touched. Knows nothing about sessions or files.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.model_loading import LoadedModel


def rope_module(lm: LoadedModel) -> Any:
    return lm.model.layers[0].self_attn.rope


def _cos_sin(rope: Any, head_dim: int, dims: int, traditional: bool, delta: int) -> tuple[mx.array, mx.array]:
    half = dims // 2
    probe = mx.zeros((1, 1, 1, head_dim), mx.float32)
    if traditional:  # pairs (2i, 2i+1)
        probe[..., 0:dims:2] = 1.0
        out = rope(probe, offset=abs(delta))
        cos, sin = out[..., 0:dims:2], out[..., 1:dims:2]
    else:  # rotate-half pairs (i, i + dims/2)
        probe[..., :half] = 1.0
        out = rope(probe, offset=abs(delta))
        cos, sin = out[..., :half], out[..., half:dims]
    return cos, (sin if delta >= 0 else -sin)


def reposition_keys(lm: LoadedModel, keys: mx.array, delta: int) -> mx.array:
    """`keys` `[B, H, n, D]` rotated at positions p, returned rotated at p + delta.

    Raises:
        UnsupportedModelError: if the model's RoPE is not a pure rotation.
    """
    if delta == 0:
        return keys
    lm.require_supported("repositioning keys")
    info = lm.rope
    assert info is not None
    dims = info.dims or keys.shape[-1]
    cos, sin = _cos_sin(rope_module(lm), keys.shape[-1], dims, info.traditional, delta)
    cos, sin = cos.astype(keys.dtype), sin.astype(keys.dtype)
    half = dims // 2
    if info.traditional:
        x1, x2 = keys[..., 0:dims:2], keys[..., 1:dims:2]
        r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        rotated = mx.stack([r1, r2], axis=-1).reshape(*keys.shape[:-1], dims)
    else:
        x1, x2 = keys[..., :half], keys[..., half:dims]
        rotated = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    if dims < keys.shape[-1]:
        rotated = mx.concatenate([rotated, keys[..., dims:]], axis=-1)
    return rotated


def check_compatible(lm: LoadedModel, what: str) -> None:
    """Refuse surgery on models whose caches kvscope cannot stand in for."""
    if lm.unsupported_reason:
        raise UnsupportedModelError(f"{what} is not supported for this model: {lm.unsupported_reason}")
