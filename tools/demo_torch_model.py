"""A PyTorch twin of mlx-lm's llama, used only to train the demo model fast on CPU.

Promises: parameter names and math match `mlx_lm.models.llama` exactly
(RMSNorm, non-traditional RoPE i.e. rotate-half, GQA with kv head = q head //
n_rep, SwiGLU MLP, tied embeddings), so `export_mlx` writes a folder that
`mlx_lm.load` reads and whose logits agree with this module's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 1536
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 704
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, theta: float, offset: int = 0) -> torch.Tensor:
    """Rotate-half RoPE over the last dim of (B, H, L, D), positions offset.. ."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float32) / (d // 2))
    pos = torch.arange(offset, offset + x.shape[-2], dtype=torch.float32)
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.c = c
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, h * hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv * hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, n, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, c.rope_theta), rope(k, c.rope_theta)
        rep = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(nn.Module):
    """Causal LM; `forward(ids)` returns logits (B, L, vocab)."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.model = Inner(c)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.num_hidden_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        h = self.model.norm(h)
        return h @ self.model.embed_tokens.weight.T


def grow(model: Llama, new_at: list[int]) -> Llama:
    """A deeper copy of `model` with fresh layers inserted at `new_at` (indices in the new stack).

    The new layers' output projections (o_proj, down_proj) start at zero, so
    each adds nothing to the residual stream and the grown model computes
    exactly what `model` did (block expansion, as in LLaMA Pro); training then
    moves them. Existing layers keep their order and weights.
    """
    depth = model.config.num_hidden_layers + len(new_at)
    if sorted(set(new_at)) != sorted(new_at) or not all(0 <= i < depth for i in new_at):
        raise ValueError(f"new layer indices {new_at} must be distinct and within 0..{depth - 1}")
    config = replace(model.config, num_hidden_layers=depth)
    grown = Llama(config)
    grown.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    grown.model.norm.load_state_dict(model.model.norm.state_dict())
    old = iter(model.model.layers)
    for i, layer in enumerate(grown.model.layers):
        if i in new_at:
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
        else:
            layer.load_state_dict(next(old).state_dict())
    return grown


def export_mlx(model: Llama, out_dir: Path, eos_token_id: int, bos_token_id: int) -> int:
    """Write config.json and model.safetensors (f32, mlx-lm llama names); returns bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "mlx"})
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **asdict(model.config),
        "rope_traditional": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_token_id, "bos_token_id": bos_token_id}, indent=2) + "\n"
    )
    return (out_dir / "model.safetensors").stat().st_size
