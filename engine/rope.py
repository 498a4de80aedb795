"""Reposition rows: rotate rows stored at position p so they sit at p + delta.

RoPE is a rotation per frequency pair, so R(p + d) = R(d) R(p) whenever the
frequencies are fixed. Which stored channels rotate, how they pair and at
what frequency is not assumed from a module's class: `caches.rope_probe`
measured it on the model at load time, per cache (`LoadedModel.rotations`):

- plain and partial rotary attention: the first `dims` channels of the keys;
- MLA, deepseek_v2 style: the cache stores concat(k_nope, k_pe): only the
  k_pe tail of the keys rotates;
- MLA, deepseek_v3 style: the cache stores (kv_latent, k_pe) as (keys,
  values): only the *values* tensor rotates, the latent never does;
- layers without RoPE: nothing moves.

A model on which the probe found anything other than one fixed rotation
per position is refused before any state changes. Knows nothing about
sessions or files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.caches.rope_probe import LayerRotation, rotate
from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.model_loading import LoadedModel

# What editing.py / surgery.py call an operation -> its name in the support table.
_OPS = {"deleting a span": "delete", "replacing a span": "replace", "splicing": "splice"}


def _rotation(lm: LoadedModel, layer: int | None) -> LayerRotation | None:
    rots = lm.rotations
    if not rots:
        return None
    if layer is not None:
        return rots[layer]
    distinct = {(r.exact, r.tensor, r.lo, r.hi, r.traditional, r.theta) for r in rots}
    if len(distinct) > 1:
        raise UnsupportedModelError(
            f"the caches of {lm.name} rotate differently per layer: reposition rows one layer at a time"
        )
    return rots[0]


def _require_exact(lm: LoadedModel, rot: LayerRotation | None) -> None:
    lm.require_supported("repositioning rows")
    if rot is not None and not rot.exact:
        raise UnsupportedModelError(
            f"repositioning rows is not supported for {lm.name}: cache {rot.index}: {rot.reason}"
        )


def reposition_rows(
    lm: LoadedModel, layer: int, keys: mx.array, values: mx.array, delta: int
) -> tuple[mx.array, mx.array]:
    """Rows of cache `layer` (`[B, H, n, D]` keys and values) moved by `delta` positions.

    Raises:
        UnsupportedModelError: if that cache's rows are not a pure rotation of position.
    """
    if delta == 0:
        return keys, values
    rot = _rotation(lm, layer)
    _require_exact(lm, rot)
    if rot is None or not rot.rotates:
        return keys, values
    if rot.tensor == "values":
        return keys, rotate(values, rot, delta)
    return rotate(keys, rot, delta), values


def reposition_keys(lm: LoadedModel, keys: mx.array, delta: int, layer: int | None = None) -> mx.array:
    """`keys` `[B, H, n, D]` rotated at positions p, returned rotated at p + delta.

    Raises:
        UnsupportedModelError: if the keys are not what rotates (MLA caches
            whose k_pe is stored as the value tensor: use `reposition_rows`)
            or the rotation is not a pure one.
    """
    if delta == 0:
        return keys
    rot = _rotation(lm, layer)
    _require_exact(lm, rot)
    if rot is None or not rot.rotates:
        return keys
    if rot.tensor != "keys":
        raise UnsupportedModelError(
            f"on {lm.name} the rotated part (k_pe) is stored in the value tensor: reposition both with reposition_rows"
        )
    return rotate(keys, rot, delta)


def key_rotation(lm: LoadedModel, layer: int) -> Callable[[mx.array, int], mx.array]:
    """`rotate(keys, delta)` for cache `layer`, as `ScopeKVCache` edits take it.

    On MLA caches whose k_pe is the value tensor the keys (the latent) never
    rotate: the function leaves them and `rotate_moved_values` turns the values.
    """
    rot = _rotation(lm, layer)
    if rot is not None and rot.tensor == "values":
        _require_exact(lm, rot)
        return lambda keys, delta: keys
    return lambda keys, delta: reposition_keys(lm, keys, delta, layer)


def rotate_moved_values(lm: LoadedModel, layer: int, cache: Any, first_token: int, delta: int) -> None:
    """After an edit moved tokens `first_token..` by `delta` positions, turn their k_pe values (MLA only)."""
    rot = _rotation(lm, layer)
    if delta == 0 or rot is None or rot.tensor != "values" or first_token >= cache.n_tokens:
        return
    keys, values, toks, _ = cache.rows_of(first_token, cache.n_tokens)
    if len(toks) == 0:
        return
    if not np.array_equal(toks, np.arange(first_token, first_token + len(toks))):
        raise UnsupportedModelError(f"cache {layer} of {lm.name} has evicted rows inside the moved tokens")
    cache.overwrite_rows(first_token, keys, rotate(values, rot, delta))


def check_compatible(lm: LoadedModel, what: str) -> None:
    """Refuse `what` (an operation name or phrase) before anything changes, per the support table."""
    lm.require(_OPS.get(what, what))
