"""Learn, per cache, which stored channels carry RoPE and how they rotate — from the model itself.

RoPE rotates channel pairs by `position * theta_j`. Instead of trusting a
module's class name, the probe feeds one token at several positions through
the whole model, on probe caches that keep only that token (so every layer
sees the same input whatever the position) and records what each cache
stores:

    offset 0  ->  k            (position 0: no rotation)
    offset 1  ->  R(theta) k   -> channels that changed, their pairing
                                  (rotate-half or interleaved), theta_j
    offsets p ->  checked against R(p * theta) k within a tolerance

So partial rotary, MLA (only `k_pe` rotates, stored as the value tensor in
deepseek_v3-style caches or as the tail of the key in deepseek_v2-style
ones), layers without RoPE (nothing changes: nothing to move) and
magnitude-scaled variants are found, and anything that is not a pure
rotation composable over positions is reported as not composable.

Promises: `probe_rotations(model)` never raises for a model mlx-lm can run;
a cache it cannot probe gets a `LayerRotation` with `exact=False` and the
reason. Knows nothing about sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

_FIT_POSITIONS = (1, 7, 64, 300)  # theta from 1, refined (unwrapped) at larger ones
_CHECK_POSITIONS = (2, 7, 64, 151, 300)
_TOL = 2e-4  # relative error allowed between the predicted and the model's rotation


@dataclass(frozen=True)
class LayerRotation:
    """How one cache's stored rows depend on position."""

    index: int
    exact: bool  # rows can be moved to another position exactly
    tensor: str  # "keys" | "values" | "" (nothing rotates)
    lo: int = 0  # rotated channel range [lo, hi) of that tensor
    hi: int = 0
    traditional: bool = False  # interleaved pairs (2i, 2i+1) instead of rotate-half
    theta: tuple[float, ...] = ()  # radians per position, one per pair
    reason: str = ""  # why not exact

    @property
    def rotates(self) -> bool:
        return bool(self.tensor)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "channels": [self.lo, self.hi],
            "traditional": self.traditional,
            "exact": self.exact,
            "reason": self.reason,
        }


class _ProbeKV(KVCache):
    """Keeps only the rows of the current call, at a chosen position."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset
        self.written: tuple[mx.array, mx.array] | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.written = (keys, values)
        self.offset += keys.shape[2]
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, *args: Any, **kwargs: Any) -> Any:
        return None


class _ProbeRotating(RotatingKVCache):
    def __init__(self, offset: int, max_size: int) -> None:
        super().__init__(max_size=max_size)
        self.offset = offset
        self.written: tuple[mx.array, mx.array] | None = None

    update_and_fetch = _ProbeKV.update_and_fetch  # type: ignore[assignment]
    make_mask = _ProbeKV.make_mask  # type: ignore[assignment]


def _run(model: nn.Module, offset: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
    caches: list[Any] = []
    for c in make_prompt_cache(model):
        name = type(c).__name__
        if name == "KVCache":
            caches.append(_ProbeKV(offset))
        elif name == "RotatingKVCache":
            caches.append(_ProbeRotating(offset, c.max_size))
        else:
            caches.append(c)  # recurrent and other kinds: their own fresh cache
    model(mx.array([[5]]), cache=caches)
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for c in caches:
        w = getattr(c, "written", None)
        if w is None:
            out.append(None)
        else:
            k, v = w
            out.append((np.array(k.astype(mx.float32)), np.array(v.astype(mx.float32))))
    return out


def _pairs(lo: int, hi: int, traditional: bool) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(lo, hi)
    if traditional:
        return idx[0::2], idx[1::2]
    half = (hi - lo) // 2
    return idx[:half], idx[half:]


def rotate(x: np.ndarray | mx.array, rot: LayerRotation, delta: int) -> mx.array:
    """Rotate the rotated channels of `x` (`[..., D]`) by `delta` positions (mx, x's dtype)."""
    a = x if isinstance(x, mx.array) else mx.array(x)
    if delta == 0 or not rot.rotates:
        return a
    i1, i2 = _pairs(rot.lo, rot.hi, rot.traditional)
    ang = np.asarray(rot.theta, np.float64) * float(delta)
    cos = mx.array(np.cos(ang).astype(np.float32)).astype(a.dtype)
    sin = mx.array(np.sin(ang).astype(np.float32)).astype(a.dtype)
    j1, j2 = mx.array(i1.astype(np.int32)), mx.array(i2.astype(np.int32))
    x1, x2 = mx.take(a, j1, axis=-1), mx.take(a, j2, axis=-1)
    out = mx.array(a)
    out[..., j1] = x1 * cos - x2 * sin
    out[..., j2] = x1 * sin + x2 * cos
    return out


def _angles(x0: np.ndarray, xp: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray | None:
    """Per pair, the angle taking x0 to xp (None if some pair is not rotated rigidly)."""
    a1, a2 = x0[..., i1].reshape(-1, len(i1)), x0[..., i2].reshape(-1, len(i2))
    b1, b2 = xp[..., i1].reshape(-1, len(i1)), xp[..., i2].reshape(-1, len(i2))
    norm = (a1 * a1 + a2 * a2).sum(0)
    if (norm <= 0).any():
        return None
    cos = (a1 * b1 + a2 * b2).sum(0) / norm
    sin = (a1 * b2 - a2 * b1).sum(0) / norm
    return np.arctan2(sin, cos)


def _fit(index: int, runs: dict[int, np.ndarray], tensor: str) -> LayerRotation | None:
    """The pure rotation per position taking runs[0] to runs[p], if there is one."""
    x0 = runs[0]
    scale = float(np.abs(x0).max()) or 1.0
    width = x0.shape[-1]
    moved = np.zeros(width, bool)
    for p in _FIT_POSITIONS:
        moved |= (np.abs(runs[p] - x0) > 1e-5 * scale).reshape(-1, width).any(0)
    changed = np.nonzero(moved)[0]
    lo, hi = int(changed.min()), int(changed.max()) + 1
    # The moved channels as one block, or the whole head with some pairs at frequency 0
    # (gemma4's proportional RoPE rotates pairs (i, i + D/2) for the first few i only).
    spans = [s for s in ((lo, hi), (0, width)) if (s[1] - s[0]) % 2 == 0]
    for (lo, hi), traditional in ((sp, t) for sp in dict.fromkeys(spans) for t in (False, True)):
        i1, i2 = _pairs(lo, hi, traditional)
        theta = _angles(x0, runs[1], i1, i2)
        if theta is None:
            continue
        for p in _FIT_POSITIONS[1:]:  # refine: the angle at p is p * theta up to whole turns
            ang = _angles(x0, runs[p], i1, i2)
            if ang is None:
                break
            turns = np.round((theta * p - ang) / (2 * np.pi))
            theta = (ang + 2 * np.pi * turns) / p
        rot = LayerRotation(index, True, tensor, lo, hi, traditional, tuple(float(t) for t in theta))
        err = float(np.abs(np.array(rotate(x0, rot, 1)) - runs[1]).max()) / scale
        if err < _TOL:
            return rot
    return None


def _layer(index: int, runs: dict[int, tuple[np.ndarray, np.ndarray]]) -> LayerRotation:
    (k0, v0), (k1, v1) = runs[0], runs[1]
    moved = [
        name
        for name, a, b in (("keys", k0, k1), ("values", v0, v1))
        if float(np.abs(a - b).max()) > _TOL * (float(np.abs(a).max()) or 1.0)  # float noise is not a move
    ]
    if not moved:
        return LayerRotation(index, True, "")
    if len(moved) == 2:
        return LayerRotation(index, False, "", reason="both keys and values change with position")
    tensor = moved[0]
    pos = 0 if tensor == "keys" else 1
    rot = _fit(index, {p: r[pos] for p, r in runs.items()}, tensor)
    if rot is None:
        return LayerRotation(
            index, False, tensor, reason="stored rows change with position in a way that is not a pure rotation"
        )
    scale = float(np.abs(runs[0][pos]).max()) or 1.0
    for p in _CHECK_POSITIONS:
        err = float(np.abs(np.array(rotate(runs[0][pos], rot, p)) - runs[p][pos]).max()) / scale
        if not err < _TOL:
            return LayerRotation(
                index,
                False,
                tensor,
                rot.lo,
                rot.hi,
                rot.traditional,
                rot.theta,
                reason=f"its RoPE is not a pure rotation per position (off by {err:.1e} at position {p}: "
                "scaled or dynamic RoPE)",
            )
    return rot


def probe_rotations(model: nn.Module) -> tuple[list[LayerRotation], list[tuple[int, int, int]], str | None]:
    """Per cache, how its rows rotate; per cache (kv heads, key dim, value dim), zeros without rows; an error if any."""
    n = len(make_prompt_cache(model))
    try:
        runs = {p: _run(model, p) for p in sorted({0, *_FIT_POSITIONS, *_CHECK_POSITIONS})}
    except Exception as exc:  # noqa: BLE001 - any model code may reject the probe caches
        why = f"the RoPE probe could not run ({type(exc).__name__}: {exc})"
        return [LayerRotation(i, False, "", reason=why) for i in range(n)], [(0, 0, 0)] * n, why
    dims = [(int(r[0].shape[1]), int(r[0].shape[3]), int(r[1].shape[3])) if r else (0, 0, 0) for r in runs[0]]
    out: list[LayerRotation] = []
    for i in range(n):
        got = {p: r[i] for p, r in runs.items()}
        if any(g is None for g in got.values()):
            out.append(LayerRotation(i, False, "", reason="this cache kind keeps no per-token rows to move"))
            continue
        out.append(_layer(i, got))  # type: ignore[arg-type]
    return out, dims, None
