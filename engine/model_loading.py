"""Load a model for kvscope: a local mlx-lm folder or a hub id through mlx-lm.

Promises:
- `load_model` returns a `LoadedModel` or raises `ModelLoadError` whose
  message names the problem (missing config, no weights, unknown
  architecture, hub unreachable) and what to do about it;
- on the CPU the weights run in float32 (f16/bf16 matmuls do not use BLAS);
- a fingerprint (sha256 over config + weights) identifies the model in
  segment files and traces;
- nothing runs the model before its cache layout is known: the layout comes
  from the model's own `make_cache()` (`caches.layout`), the RoPE of every
  cache from a probe on caches of the kinds the model asks for
  (`caches.rope_probe`), and `support` says, per operation, whether it is
  exact, measured or refused on this model (`caches.support`).

Knows nothing about sessions or the window.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from kvscope.engine import head_attention
from kvscope.engine.caches.layout import CacheLayout, detect_layout
from kvscope.engine.caches.rope_probe import LayerRotation, probe_rotations
from kvscope.engine.caches.support import SupportTable, Verdict, build_table
from kvscope.engine.errors import ModelLoadError, UnsupportedModelError

_FULL_HASH_LIMIT = 512 * 1024 * 1024  # hash every byte below this, sample above
_SAMPLE = 4 * 1024 * 1024


def demo_model_path() -> Path:
    """The bundled demo model folder (assets/models/kvscope-demo)."""
    return Path(str(resources.files("kvscope.assets").joinpath("models/kvscope-demo")))


@dataclass(frozen=True)
class RopeInfo:
    """What repositioning needs to know about the model's RoPE."""

    kind: str  # class name of the rope module
    dims: int  # rotated dims (< head_dim for partial rotary)
    base: float | None
    traditional: bool
    scale: float | None
    composable: bool  # True when R(p + d) == R(d) @ R(p) exactly

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dims": self.dims,
            "base": self.base,
            "traditional": self.traditional,
            "scale": self.scale,
        }


@dataclass
class LoadedModel:
    """A model ready to run, with what kvscope needs to know about it."""

    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict[str, Any]
    path: Path
    name: str
    fingerprint: str
    dtype: str
    n_layers: int  # caches, one per cache-carrying layer (see layout.n_model_layers)
    n_kv_heads: int
    head_dim: int
    rope: RopeInfo | None
    unsupported_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layout: CacheLayout | None = None
    rotations: list[LayerRotation] = field(default_factory=list)
    support: SupportTable | None = None
    value_dim_: int | None = None  # width of stored values when it differs from head_dim (MLA)
    cache_dims: list[tuple[int, int, int]] = field(default_factory=list)  # per cache: kv heads, key dim, value dim

    @property
    def value_dim(self) -> int:
        return self.value_dim_ if self.value_dim_ is not None else self.head_dim

    @property
    def bytes_per_token(self) -> int:
        """K + V bytes one token occupies across all layers."""
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize

    def require_supported(self, what: str) -> None:
        """Raise `UnsupportedModelError` if rows cannot be moved exactly on this model."""
        if self.unsupported_reason:
            raise UnsupportedModelError(f"{what} is not supported for this model: {self.unsupported_reason}")

    def require(self, op: str) -> Verdict:
        """The support verdict of operation `op`; raises `UnsupportedModelError` if refused."""
        if self.support is None:
            return Verdict(op, "exact")
        return self.support.require(op)


def _check_folder(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} is not a model folder: config.json is missing")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{cfg_file} has no 'model_type': not an mlx-lm / Hugging Face config")
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    return config


def fingerprint_folder(path: Path) -> str:
    """sha256 over config.json and the weight files (sampled for very large ones)."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for wf in sorted(path.glob("*.safetensors")):
        size = wf.stat().st_size
        h.update(f"{wf.name}:{size}".encode())
        with wf.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                for start in range(0, size, size // 64):
                    fh.seek(start)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:32]


def _resolve(id_or_path: str) -> Path:
    path = Path(os.path.expanduser(id_or_path))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; give the model folder (with config.json and *.safetensors)")
        return path
    is_hub_id = id_or_path.count("/") == 1 and not id_or_path.startswith((".", "/", "~"))
    if not is_hub_id:
        raise ModelLoadError(f"no model folder at {path}, and {id_or_path!r} is not a hub id (owner/name)")
    from mlx_lm.utils import _download  # the real hub path, through mlx-lm

    try:
        return Path(_download(id_or_path))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes
        raise ModelLoadError(
            f"cannot load {id_or_path!r}: it is not a local folder (there is nothing at {path.resolve()}), and as a "
            f"hub id it could not be fetched ({type(exc).__name__}): the model hub is unreachable from this machine "
            "or has no such model. Check the folder's path, or download the model elsewhere and pass its local "
            "folder (`kvscope chat --model /path/to/model`), or run without --model for the bundled demo model."
        ) from exc


def _rope_info(model: nn.Module, rotations: list[LayerRotation]) -> RopeInfo | None:
    layers = getattr(model, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    rope = getattr(attn, "rope", None)
    if rope is None:
        return None
    kind = type(rope).__name__
    dims = int(getattr(rope, "dims", getattr(rope, "dim", 0)) or 0)
    # Whether rotating by d after p equals rotating by p + d is measured on the
    # model itself (caches.rope_probe); the class name only describes it.
    composable = all(r.exact for r in rotations)
    return RopeInfo(
        kind=kind,
        dims=dims,
        base=getattr(rope, "base", None),
        traditional=bool(getattr(rope, "traditional", False)),
        scale=getattr(rope, "scale", None),
        composable=composable,
    )


def _unsupported_reason(support: SupportTable) -> str | None:
    """Why rows cannot be moved (spliced, deleted with shift) on this model, or None."""
    v = support.verdict("splice")
    return v.reason if v.status == "refused" else None


def load_model(id_or_path: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a local mlx-lm model folder or a hub id.

    Args:
        id_or_path: folder path or `owner/name` hub id; None for the demo model.

    Returns:
        The loaded model with tokenizer, fingerprint and layout.

    Raises:
        ModelLoadError: with a message that names the problem.
    """
    from mlx_lm.utils import load as mlx_load

    target = str(id_or_path) if id_or_path is not None else str(demo_model_path())
    path = _resolve(target)
    config = _check_folder(path)
    try:
        model, tokenizer = mlx_load(str(path))[:2]
    except Exception as exc:  # noqa: BLE001 - mlx-lm raises ValueError/KeyError/OSError...
        raise ModelLoadError(f"mlx-lm could not load {path}: {type(exc).__name__}: {exc}") from exc
    dtype = compute_dtype(model, mx.default_device())
    if dtype == "float32":
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    head_attention.install(model)  # head-wise compressed caches (also reopened ones) attend per head
    name = path.name if Path(target).exists() else target
    try:
        layout = detect_layout(model)
    except Exception as exc:  # noqa: BLE001 - a model's make_cache may reject its own config
        raise ModelLoadError(f"{name}: the model could not build its caches ({type(exc).__name__}: {exc})") from exc
    rotations, dims, _ = probe_rotations(model)  # a failed probe refuses row moves, not chat
    support = build_table(name, layout, rotations)
    rope = _rope_info(model, [r for r, e in zip(rotations, layout.entries) if e.kind == "attention"])
    n_kv_heads, head_dim, value_dim = next((d for d in dims if d[0]), (0, 0, 0))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        path=path,
        name=name,
        fingerprint=fingerprint_folder(path),
        dtype=dtype,
        n_layers=layout.n_caches,  # cache-carrying layers (shared-KV layers keep none)
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope=rope,
        unsupported_reason=_unsupported_reason(support),
        layout=layout,
        rotations=rotations,
        support=support,
        value_dim_=value_dim,
        cache_dims=dims,
    )


def compute_dtype(model: nn.Module, device: mx.Device) -> str:
    """The dtype the model computes in: float32 on the CPU (its BLAS path), else the checkpoint's
    float dtype — never the packed uint32 of a quantized model's weights."""
    return "float32" if device == mx.cpu else _param_dtype(model)


def weights_format(config: dict[str, Any]) -> str:
    """How the weights are stored, e.g. '4-bit quantized (group 64)' or 'float16'."""
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and isinstance(q.get("bits"), int):
        return f"{q['bits']}-bit quantized (group {q.get('group_size', '?')})"
    return str(config.get("torch_dtype") or config.get("dtype") or "float (checkpoint)")


def _param_dtype(model: nn.Module) -> str:
    from mlx.utils import tree_flatten

    # The compute dtype: a quantized model packs its weights into uint32, but its
    # scales, norms and activations keep the checkpoint's float dtype.
    flat: Any = tree_flatten(model.parameters())
    floats = [v.dtype for _, v in flat if mx.issubdtype(v.dtype, mx.floating)]
    return str(floats[0]).replace("mlx.core.", "") if floats else "float32"
