"""`Engine.info()`: device, dtype, BLAS, model, cache layout and memory, for `kvscope info` and the status bar."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from kvscope.engine import blas
from kvscope.engine.budget import MemoryBudget
from kvscope.engine.config import EngineConfig
from kvscope.engine.model_loading import LoadedModel, weights_format
from kvscope.engine.prefix_store import PrefixStore
from kvscope.engine.saved_sessions import SavedSessions


def engine_info(
    lm: LoadedModel | None,
    config: EngineConfig,
    budget: MemoryBudget,
    n_sessions: int,
    store: PrefixStore | None,
    files: SavedSessions,
) -> dict[str, Any]:
    b = blas.info()
    out: dict[str, Any] = {
        "device": str(mx.default_device()),
        "mlx": getattr(mx, "__version__", "?"),
        "blas": b.name,
        "blas_path": b.path,
        "blas_note": b.reason,
        "block_size": config.block_size,
        "prefix_budget_bytes": config.prefix_budget_bytes,
        "memory_budget_bytes": budget.limit,
        "data_dir": str(files.data_dir) if files.data_dir else None,
        "load_errors": list(files.load_errors),
        "sessions": n_sessions,
        "cache_bytes": budget.used(),
        "prefix_store_bytes": store.nbytes if store else 0,
    }
    if lm is not None:
        out.update(
            model=lm.name,
            model_path=str(lm.path),
            fingerprint=lm.fingerprint,
            dtype=lm.dtype,  # the compute dtype (model_loading.compute_dtype)
            weights=weights_format(lm.config),
            layers=lm.n_layers,
            kv_heads=lm.n_kv_heads,
            head_dim=lm.head_dim,
            rope=lm.rope.as_dict() if lm.rope else None,
            surgery_supported=lm.unsupported_reason is None,
            unsupported_reason=lm.unsupported_reason,
            cache_layout=lm.layout.as_dict() if lm.layout else None,
            cache_layout_text=lm.layout.describe() if lm.layout else "",
            operations=lm.support.as_rows() if lm.support else [],
        )
    return out
