"""kvscope's engine: MLX sessions over a block-level KV cache. Imports no Qt.

The optimized-BLAS preload must run before anything imports mlx, so it is
the first thing this package does.
"""

from kvscope.engine import blas as _blas

_blas.preload()

from kvscope.engine.engine import Engine, EngineConfig  # noqa: E402
from kvscope.engine.errors import (  # noqa: E402
    CancelledError,
    InvalidRequestError,
    KVScopeError,
    ModelLoadError,
    UnsupportedModelError,
)
from kvscope.engine.generation import SamplingParams  # noqa: E402
from kvscope.engine.model_loading import LoadedModel, demo_model_path, load_model  # noqa: E402
from kvscope.engine.splicing import SpliceOptions  # noqa: E402

__all__ = [
    "SpliceOptions",
    "CancelledError",
    "Engine",
    "EngineConfig",
    "InvalidRequestError",
    "KVScopeError",
    "LoadedModel",
    "ModelLoadError",
    "SamplingParams",
    "UnsupportedModelError",
    "demo_model_path",
    "load_model",
]
