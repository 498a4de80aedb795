"""Shared fixtures: tiny random models on disk (llama, qwen2, phi3)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Saved sessions of test runs never land in the person's own data folder.
os.environ["KVSCOPE_HOME"] = os.path.join(__import__("tempfile").mkdtemp(prefix="kvscope-test-home-"))
sys.path.insert(0, str(Path(__file__).parent))

import kvscope.engine  # noqa: E402,F401  - preloads BLAS before mlx
from tiny_models import ARCHS, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(params=sorted(ARCHS))
def arch_dir(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs[request.param]
