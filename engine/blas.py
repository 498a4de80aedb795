"""Make MLX's CPU matmuls use an optimized BLAS, before `mlx` is imported.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS, ~10x slower for
float32 matmuls than OpenBLAS. Loading an optimized library that exports
`cblas_sgemm` with RTLD_GLOBAL *before* `import mlx` makes the dynamic linker
bind MLX's BLAS calls to it (ELF symbol interposition). This module must be
imported before anything imports mlx; `kvscope.engine` does so first.

Set `KVSCOPE_BLAS=off` to keep the reference BLAS (for `bench/blas.py`), or
`KVSCOPE_BLAS=/path/to/libblas.so` to pick a library.

Knows nothing about models; on macOS it does nothing (Accelerate is used).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

# Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial), Fedora, and pip's mkl wheel.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    os.path.join(sys.prefix, "lib", "libmkl_rt.so.2"),
)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU matmuls use in this process."""

    name: str  # "accelerate", "openblas", "mkl", "reference", ...
    path: str | None
    reason: str


_INFO: BlasInfo | None = None


def _name_of(path: str) -> str:
    low = path.lower()
    if "mkl" in low:
        return "mkl"
    if "openblas" in low:
        return "openblas"
    return os.path.basename(path)


def preload() -> BlasInfo:
    """Load an optimized BLAS globally if one is found; idempotent.

    Returns:
        What was loaded, or why nothing was.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    if sys.platform == "darwin":
        _INFO = BlasInfo("accelerate", None, "macOS: MLX uses Accelerate/Metal")
        return _INFO
    choice = os.environ.get("KVSCOPE_BLAS", "auto")
    if choice.lower() in ("off", "0", "reference", "none"):
        _INFO = BlasInfo("reference", None, "disabled by KVSCOPE_BLAS=off")
        return _INFO
    if "mlx.core" in sys.modules:
        _INFO = BlasInfo("reference", None, "mlx was imported before kvscope.engine")
        return _INFO
    candidates = (choice,) if choice != "auto" else _CANDIDATES
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.cblas_sgemm  # noqa: B018 - raises AttributeError if absent
        except (OSError, AttributeError) as exc:
            _INFO = BlasInfo("reference", None, f"could not use {path}: {exc}")
            continue
        _INFO = BlasInfo(_name_of(path), path, "preloaded with RTLD_GLOBAL")
        return _INFO
    if _INFO is None:
        _INFO = BlasInfo(
            "reference",
            None,
            "no optimized BLAS found (Debian: apt-get install libopenblas0-pthread)",
        )
    return _INFO


def info() -> BlasInfo:
    """The BLAS in use (calls `preload` if it has not run)."""
    return preload()
