"""Fidelity: how far an edited cache is from a full recompute of the same tokens.

The reference is a fresh prefill of the session's visible tokens (layer 0's
view) in logical order at their recorded positions (a masked span or a
delete that kept positions leaves a gap there too). Both caches then read the
same probe tokens (the template text of a new user turn); the report
compares their next-token distributions at every probe position: mean
logit cosine, mean KL(reference || edited), and top-1 agreement.

Knows nothing about which operation was done; callers pass its name.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine import chat
from kvscope.engine.caches.layout import make_session_caches
from kvscope.engine.generation import forward, prefill
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.session import Session

PROBE_MESSAGE = "Please continue."


@dataclass(frozen=True)
class FidelityReport:
    operation: str
    cosine: float  # mean cosine of next-token logits, edited vs recompute
    kl: float  # mean KL(recompute || edited), nats
    top1_agree: float  # fraction of probe positions with the same argmax
    n_probe: int
    elapsed_ms: float  # the operation itself
    recompute_ms: float  # the full recompute it is compared with
    rows_changed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.operation}: cosine {self.cosine:.4f}, KL {self.kl:.4f}, top-1 {self.top1_agree:.0%} "
            f"({self.elapsed_ms:.1f} ms vs recompute {self.recompute_ms:.1f} ms)"
        )


def probe_tokens(lm: LoadedModel, s: Session) -> list[int]:
    messages = s.messages + [{"role": "user", "content": PROBE_MESSAGE}]
    delta = chat.delta_text(lm.tokenizer, s.transcript_text, messages) if s.messages else None
    return chat.encode(lm.tokenizer, delta if delta else f"\n{PROBE_MESSAGE}\n")


def visible_tokens(s: Session) -> tuple[list[int], np.ndarray]:
    """Ids and positions of the tokens the first attention cache attends, in logical order.

    A model without one (recurrent state only) attends every token it has seen.
    """
    c = next((c for c in s.caches if isinstance(c, ScopeKVCache)), None)
    if c is None:
        return list(s.tokens), np.arange(s.n_tokens)
    vis = c.visible_tokens
    return [s.tokens[i] for i in vis], c.token_positions[vis]


def compare_logits(ref: mx.array, got: mx.array) -> tuple[float, float, float]:
    """(mean cosine, mean KL(ref||got), top-1 agreement) over rows of `[n, vocab]`."""
    r, g = np.array(ref, np.float64), np.array(got, np.float64)
    cos = (r * g).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1) + 1e-12)
    lr = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
    lg = g - np.logaddexp.reduce(g, axis=-1, keepdims=True)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    top1 = r.argmax(-1) == g.argmax(-1)
    return float(cos.mean()), float(max(kl.mean(), 0.0)), float(top1.mean())


def recompute_logits(
    lm: LoadedModel, tokens: list[int], positions: np.ndarray | None, probe: list[int], chunk: int = 512
) -> mx.array:
    """Logits of `probe` after a fresh prefill of `tokens` at `positions` (None = 0, 1, 2, ...)."""
    caches = make_session_caches(lm.model)  # the model's own layout (sliding, recurrent...)
    pos = np.arange(len(tokens)) if positions is None else np.asarray(positions)
    runs = np.split(np.arange(len(tokens)), np.nonzero(np.diff(pos) != 1)[0] + 1) if len(tokens) else []
    for run in runs:  # each run of consecutive positions is one plain prefill
        for c in caches:
            c.advance_to(int(pos[run[0]]))
        prefill(lm.model, caches, [tokens[i] for i in run], chunk)
    return forward(lm.model, probe, caches)[0]


def measure(
    lm: LoadedModel, s: Session, operation: str, elapsed_ms: float, rows_changed: int = 0, **extra: Any
) -> FidelityReport:
    """Compare the session's cache with a full recompute of its visible tokens."""
    probe = probe_tokens(lm, s)
    t0 = time.perf_counter()
    ref = recompute_logits(lm, *visible_tokens(s), probe)
    mx.eval(ref)
    recompute_ms = (time.perf_counter() - t0) * 1000
    got = forward(lm.model, probe, [c.copy() for c in s.caches])[0]
    cos, kl, top1 = compare_logits(ref, got)
    return FidelityReport(operation, cos, kl, top1, len(probe), elapsed_ms, recompute_ms, rows_changed, dict(extra))
