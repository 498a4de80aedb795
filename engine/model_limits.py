"""What a file may claim about the loaded model: the ranges every field is checked against.

A token id indexes the embedding table, so one outside it reads memory that
is not the model's (on the CPU a SIGSEGV); a position feeds RoPE, whose
float32 angles `position * frequency` stop telling integers apart above
2^24. Files (segments, sessions, archives) are checked against these limits
before anything of theirs reaches the model.

Knows nothing about file formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvscope.engine.model_loading import LoadedModel

MAX_POSITION = 1 << 24  # exclusive; float32 holds every integer below 2^24 exactly
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embedding.weight")


@dataclass(frozen=True)
class ModelLimits:
    fingerprint: str
    name: str
    vocab_size: int  # rows of the embedding table: valid ids are [0, vocab_size)
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_position: int = MAX_POSITION
    # Non-plain layouts (caches.session_kinds): the session's caches as the model lays them out, per-cache
    # [kv heads, key dim, value dim], and the shape/dtype of each recurrent state (measured on first use).
    new_caches: Callable[[], list[Any]] | None = None
    cache_dims: tuple[tuple[int, int, int], ...] = ()
    state_specs: Callable[[], dict[int, list[Any]]] | None = None

    def bad_token(self, ids: Any) -> int:
        """Index of the first entry of `ids` that is not a valid token id, else -1."""
        return next((i for i, t in enumerate(ids) if not (_is_int(t) and 0 <= t < self.vocab_size)), -1)

    def bad_position(self, positions: Any) -> int:
        """Index of the first entry that is not a position in [0, max_position), else -1."""
        return next((i for i, p in enumerate(positions) if not (_is_int(p) and 0 <= p < self.max_position)), -1)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def vocab_size(lm: LoadedModel) -> int:
    """Rows of the model's input embedding (config's vocab_size if the table is not found)."""
    cached = lm.extra.get("vocab_rows")
    if isinstance(cached, int):
        return cached
    from mlx.utils import tree_flatten

    rows = None
    flat: list[tuple[str, Any]] = tree_flatten(lm.model.parameters())  # type: ignore[assignment]
    for key, value in flat:
        if key.endswith(_EMBEDDINGS) and getattr(value, "ndim", 0) == 2:
            rows = int(value.shape[0])
            break
    if rows is None:
        cfg = lm.config.get("text_config", lm.config) if isinstance(lm.config, dict) else {}
        rows = int(cfg.get("vocab_size") or lm.config.get("vocab_size") or len(lm.tokenizer.get_vocab()))
    lm.extra["vocab_rows"] = rows
    return rows


def limits_of(lm: LoadedModel) -> ModelLimits:
    from kvscope.engine.caches.layout import make_session_caches
    from kvscope.engine.caches.session_kinds import state_shapes

    def specs() -> dict[int, list[Any]]:
        if "state_specs" not in lm.extra:
            lm.extra["state_specs"] = state_shapes(lm.model, lambda: make_session_caches(lm.model))
        return lm.extra["state_specs"]  # type: ignore[no-any-return]

    return ModelLimits(
        lm.fingerprint,
        lm.name,
        vocab_size(lm),
        lm.n_layers,
        lm.n_kv_heads,
        lm.head_dim,
        new_caches=lambda: make_session_caches(lm.model),
        cache_dims=tuple(tuple(d) for d in lm.cache_dims),  # type: ignore[misc]
        state_specs=specs,
    )
