"""The model zoo: one tiny random model per mlx-lm architecture, checked against mlx-lm itself.

For one architecture `check_arch` builds the model (optionally quantized),
loads it through `Engine.load(folder)` as a user would, and checks:

- chat parity (the oracle is plain `mlx_lm.stream_generate`, greedy, on the
  same prompt tokens): a fresh session, its second turn (a full recompute
  of the whole transcript in mlx-lm) and a second session on the same first
  message (the prefix-hit path where the model allows it);
- every cache operation: it must be *exact* (checked against a recompute:
  the first cache's stored rows, which depend only on token and position,
  equal those of a recompute of the same tokens at the same positions, and
  for appends the next-token logits equal a recompute), *measured* (it ran
  and the fidelity report is shown), or *refused* with
  `UnsupportedModelError` before anything changed (the session is byte for
  byte the same). Anything else is a crash or a silent mismatch.

Used by tests/engine/test_architectures.py (a subset) and bench/model_zoo.py
(the whole zoo).
"""

from __future__ import annotations

import hashlib
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvscope.engine.caches.layout import make_session_caches
from kvscope.engine.engine import Engine
from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.fidelity import measure
from kvscope.engine.generation import SamplingParams, forward, prefill
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.splicing import SpliceOptions
from tiny_models import QuantizeError, make_zoo_model

PROMPT_1 = "the code for locker seven is red blue green"
PROMPT_2 = "and what is the name of the other one"
N_TOKENS = 10
TOL = 1e-4
OPERATIONS = ("mask", "delete", "splice", "replace", "erratum", "compress", "segment files", "persistence")

# Modules that are not text models or need what this machine lacks.
SKIP = {
    "bitnet": "its BitLinear layers run a Metal kernel only (no CPU path in mlx-lm)",
    "olmo": "needs the ai2-olmo package (mlx-lm imports hf_olmo)",
    "muse_spark": "its attention runs a Metal kernel only (no CPU path in mlx-lm)",
    "phi3small": "plain mlx-lm crashes on it on the CPU (double free inside mlx during generation)",
    "prism_hadamard_qwen35": "a weight-format module, not an architecture with ModelArgs",
}


# Where plain mlx-lm disagrees with itself, kvscope follows the model's own mask (and so
# equals its own full recompute) and the greedy tokens can differ from mlx-lm's decode.
MLX_LM_DIFFERS = {
    "plamo3": "mlx-lm masks window + 1 positions in prefill but its RotatingKVCache(window) holds window rows "
    "in decode; kvscope attends window + 1 in both",
}


@dataclass
class ArchResult:
    arch: str
    bits: int | None = None
    status: str = "ok"  # ok | skipped | crash
    reason: str = ""
    layout: str = ""
    parity: dict[str, bool] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)  # op -> "exact" | "measured ..." | "refused: ..." | "CRASH ..."

    @property
    def name(self) -> str:
        return self.arch + (f" q{self.bits}" if self.bits else "")

    @property
    def crashes(self) -> list[str]:
        out = [f"{op}: {v}" for op, v in self.ops.items() if v.startswith(("CRASH", "MISMATCH", "CHANGED"))]
        return ([f"load: {self.reason}"] if self.status == "crash" else []) + out

    @property
    def mismatches(self) -> list[str]:
        """Parity failures that are not explained by mlx-lm disagreeing with itself."""
        if self.arch in MLX_LM_DIFFERS:
            return []
        return [k for k, ok in self.parity.items() if not ok]


class Oracle:
    """Plain mlx-lm on the same folder: greedy tokens for a prompt."""

    def __init__(self, folder: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(folder))[:2]
        if mx.default_device() == mx.cpu:
            self.model.set_dtype(mx.float32)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        return [
            r.token
            for r in stream_generate(self.model, self.tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0))
        ]


def _same_prefix(got: list[int], ref: list[int]) -> bool:
    return len(got) > 0 and got == ref[: len(got)] and (len(got) == len(ref) or len(got) == N_TOKENS)


def check_chat(eng: Engine, oracle: Oracle, res: ArchResult) -> str:
    """Chat parity: fresh session, second turn, prefix-hit session. Returns the first session id."""
    p = SamplingParams(max_tokens=N_TOKENS)
    sid = eng.new_session()
    r1 = eng.chat(sid, PROMPT_1, p)
    s = eng.session(sid)
    res.parity["turn 1"] = _same_prefix(r1.token_ids, oracle.greedy(s.tokens[: r1.stats.prompt_tokens], N_TOKENS))
    r2 = eng.chat(sid, PROMPT_2, p)
    res.parity["turn 2"] = _same_prefix(r2.token_ids, oracle.greedy(s.tokens[: r2.stats.prompt_tokens], N_TOKENS))
    other = eng.new_session()
    r3 = eng.chat(other, PROMPT_1, p)
    res.parity["new session"] = r3.token_ids == r1.token_ids
    eng.close_session(other)
    return sid


def _fingerprint(eng: Engine, sid: str) -> str:
    """Bytes of everything an edit could change: tokens, bookkeeping, every cache's arrays."""
    s = eng.session(sid)  # type: ignore[arg-type]
    h = hashlib.sha256(repr((s.tokens, s.origin, s.positions, len(s.messages))).encode())
    for c in s.caches:
        h.update(repr((type(c).__name__, c.offset, c.n_tokens, c.n_rows)).encode())
        h.update(np.asarray(c.token_positions).tobytes() + np.asarray(c.visible_tokens).tobytes())
        state = c.state if c.n_rows or not isinstance(c, ScopeKVCache) else ()
        for a in _arrays(state):
            h.update(np.array(a.astype(mx.float32) if a.dtype not in (mx.uint32, mx.int32) else a).tobytes())
    return h.hexdigest()


def _arrays(tree: Any) -> list[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    return []


def _recompute(eng: Engine, tokens: list[int], positions: np.ndarray) -> list[Any]:
    """Fresh caches fed `tokens` at `positions`, one prefill per run of consecutive positions."""
    lm = eng.model
    rc = make_session_caches(lm.model)
    starts = [0, *(np.nonzero(np.diff(positions) != 1)[0] + 1), len(positions)]
    for a, b in zip(starts[:-1], starts[1:]):
        for x in rc:
            x.advance_to(int(positions[a]))
        forward(lm.model, tokens[a:b], rc)
    return rc


def first_rows_error(eng: Engine, sid: str) -> float:
    """Relative error between the first cache's rows and a recompute of the same tokens at the same positions.

    The first layer's K/V depend only on each token and its position (no
    context yet), so a recompute of each contiguous run of positions at its
    position is the exact reference for every row, spliced or not.
    """
    s = eng.session(sid)  # type: ignore[arg-type]
    c = s.caches[0]
    assert isinstance(c, ScopeKVCache), "row checks need a full-attention first cache"
    keys, values, toks, _ = c.rows_of(0, c.n_tokens)
    pos = c.token_positions[toks]
    rc = _recompute(eng, [s.tokens[t] for t in toks], pos)
    want_k, want_v, _, _ = rc[0].rows_of(0, rc[0].n_tokens)
    worst = 0.0
    for got, want in ((keys, want_k), (values, want_v)):
        scale = float(mx.abs(want).max().item()) or 1.0
        worst = max(worst, float(mx.abs(got - want).max().item()) / scale)
    return worst


def masked_logits_error(eng: Engine, sid: str) -> float:
    """Max relative difference of next-token logits: the masked session vs never having seen the masked tokens.

    The reference feeds only the visible tokens, each at its own position
    (gaps kept), into fresh caches: exactly what masking promises.
    """
    lm, s = eng.model, eng.session(sid)  # type: ignore[arg-type]
    c = next(c for c in s.caches if isinstance(c, ScopeKVCache))
    vis = c.visible_tokens
    rc = _recompute(eng, [s.tokens[t] for t in vis], c.token_positions[vis])
    for x in rc:
        x.advance_to(c.offset)
    got = forward(lm.model, [5], [x.copy() for x in s.caches])[0, -1]
    want = forward(lm.model, [5], rc)[0, -1]
    scale = float(mx.abs(want).max().item()) or 1.0
    return float(mx.abs(got - want).max().item()) / scale


def logits_error(eng: Engine, sid: str) -> float:
    """Max relative difference of next-token logits: the session's cache vs a recompute of its tokens."""
    lm, s = eng.model, eng.session(sid)  # type: ignore[arg-type]
    probe = [5]  # a token not yet fed: every cached token is in the cache already
    got = forward(lm.model, probe, [c.copy() for c in s.caches])[0, -1]
    rc = make_session_caches(lm.model)
    prefill(lm.model, rc, s.tokens, 512)
    want = forward(lm.model, probe, rc)[0, -1]
    scale = float(mx.abs(want).max().item()) or 1.0
    return float(mx.abs(got - want).max().item()) / scale


def compressed_logits_error(eng: Engine, sid: str) -> float | None:
    """After compress: None if a cache's rows differ from the decision, else the relative logit
    error against a recompute of every token whose caches then drop the decision's evicted rows."""
    lm, s = eng.model, eng.session(sid)  # type: ignore[arg-type]
    d = s.last_decision
    if d is None or len(d.layers) != len(s.caches):
        return None
    for c, layer in zip(s.caches, d.layers):
        if isinstance(c, ScopeKVCache) and not np.array_equal(np.sort(c.visible_tokens), np.sort(layer.kept)):
            return None
        if not isinstance(c, ScopeKVCache) and len(layer.evicted):
            return None
    rc = make_session_caches(lm.model)
    prefill(lm.model, rc, s.tokens, 512)
    for c, layer in zip(rc, d.layers):
        if len(layer.evicted):
            c.evict_tokens(layer.evicted)
    got = forward(lm.model, [5], [c.copy() for c in s.caches])[0, -1]
    want = forward(lm.model, [5], rc)[0, -1]
    scale = float(mx.abs(want).max().item()) or 1.0
    return float(mx.abs(got - want).max().item()) / scale


def continuation_error(eng: Engine, sid: str, other: str) -> float:
    """Max relative difference of next-token logits between two sessions fed the same new token."""
    lm = eng.model
    a, b = eng.session(sid), eng.session(other)  # type: ignore[arg-type]
    if a.tokens != b.tokens:
        return float("inf")
    got = forward(lm.model, [5], [c.copy() for c in b.caches])[0, -1]
    want = forward(lm.model, [5], [c.copy() for c in a.caches])[0, -1]
    scale = float(mx.abs(want).max().item()) or 1.0
    return float(mx.abs(got - want).max().item()) / scale


def _verdict(eng: Engine, op: str) -> str:
    return eng.model.support.verdict(op).status if eng.model.support else "exact"


def _run_op(eng: Engine, sid: str, op: str, tmp: Path) -> str:
    s = eng.session(sid)  # type: ignore[arg-type]
    n = s.n_tokens
    lo, hi = 2, min(6, n - 2)
    if op == "mask":  # the last tokens: no later row saw them, so "never seen" is the exact reference
        rep = eng.mask(sid, n - 4, n)  # type: ignore[arg-type]
        err = masked_logits_error(eng, sid)
        if _verdict(eng, op) == "exact":
            return "exact" if err < TOL else f"MISMATCH masked logits off by {err:.1e}"
        return f"measured (cos {rep.cosine:.3f}; logits vs never-seen off by {err:.1e})"
    if op == "delete":
        eng.delete_span(sid, lo, hi, shift=True, fidelity=False)  # type: ignore[arg-type]
        return _exact_rows(eng, sid)
    if op == "splice":
        eng.splice(sid, sid, lo, hi, SpliceOptions(at=None, fidelity=False))  # type: ignore[arg-type]
        return _exact_rows(eng, sid)
    if op == "replace":
        eng.replace_span(sid, lo, hi, "blue red", fidelity=False)  # type: ignore[arg-type]
        return _exact_rows(eng, sid)
    if op == "erratum":
        eng.erratum(sid, "[update] the code is green", fidelity=False)  # type: ignore[arg-type]
        err = logits_error(eng, sid)
        return "exact" if err < TOL else f"MISMATCH logits off by {err:.1e}"
    if op == "compress":
        eng.compress(sid, "key_norm", keep_ratio=0.5)  # type: ignore[arg-type]
        err = compressed_logits_error(eng, sid)
        if err is None:
            return "MISMATCH the caches do not keep the rows the decision says"
        if err >= TOL:
            return f"MISMATCH logits off by {err:.1e} from a recompute with the evicted rows dropped"
        rep = measure(eng.model, s, "compress", 0.0)
        return f"measured (cos {rep.cosine:.3f})"
    if op == "persistence":  # export -> import: the reopened session continues like the never-saved one
        path = tmp / "session.kvsession"
        eng.export_session(sid, path)  # type: ignore[arg-type]
        other = eng.import_session(path)
        try:
            err = continuation_error(eng, sid, other)
        finally:
            eng.close_session(other)
        return "exact" if err < TOL else f"MISMATCH reopened logits off by {err:.1e}"
    if op == "segment files":
        path = tmp / "seg.kvseg"
        eng.save_segment(sid, lo, hi, path)  # type: ignore[arg-type]
        eng.splice_file(sid, path, SpliceOptions(at=None, fidelity=False))  # type: ignore[arg-type]
        return _exact_rows(eng, sid)
    raise ValueError(op)


def _exact_rows(eng: Engine, sid: str) -> str:
    err = first_rows_error(eng, sid)
    return "exact" if err < TOL else f"MISMATCH rows off by {err:.1e}"


def check_ops(eng: Engine, base_sid: str, res: ArchResult, tmp: Path) -> None:
    """Each operation on its own copy of the chat: exact, measured or refused (state unchanged)."""
    for op in OPERATIONS:
        sid = eng.duplicate_session(base_sid)  # type: ignore[arg-type]
        before = _fingerprint(eng, sid)
        try:
            res.ops[op] = _run_op(eng, sid, op, tmp)
        except UnsupportedModelError as exc:
            after = _fingerprint(eng, sid)
            res.ops[op] = f"refused: {exc}" if after == before else f"CHANGED before refusing: {exc}"
        except Exception as exc:  # noqa: BLE001 - the point is to catch every crash
            res.ops[op] = f"CRASH {type(exc).__name__}: {exc}"
            res.reason = res.reason or traceback.format_exc(limit=-3)
        finally:
            eng.close_session(sid)  # type: ignore[arg-type]


def check_arch(arch: str, bits: int | None = None, ops: bool = True, root: Path | None = None) -> ArchResult:
    """Build, load, chat and (with `ops`) run every operation on one zoo architecture."""
    res = ArchResult(arch, bits)
    if arch in SKIP:
        res.status, res.reason = "skipped", SKIP[arch]
        return res
    tmp = Path(tempfile.mkdtemp(dir=root))
    try:
        folder = make_zoo_model(tmp / arch, arch, bits=bits)
    except QuantizeError as exc:
        res.status, res.reason = "skipped", str(exc)
        return res
    except Exception as exc:  # noqa: BLE001 - a config that does not build is reported, not fatal
        res.status, res.reason = "skipped", f"the tiny config does not build: {type(exc).__name__}: {exc}"
        return res
    if bits is not None:  # a quantized build mlx-lm itself cannot run is mlx-lm's limit, reported as such
        try:
            oracle = Oracle(folder)
            oracle.greedy([5, 6, 7], 2)
        except Exception as exc:  # noqa: BLE001
            res.status = "skipped"
            res.reason = f"mlx-lm itself cannot run the {bits}-bit build: {type(exc).__name__}: {exc}"
            return res
    try:
        eng = Engine()
        lm = eng.load(folder)
        res.layout = lm.layout.describe() if lm.layout else ""
        oracle = Oracle(folder)
        sid = check_chat(eng, oracle, res)
        if ops:
            check_ops(eng, sid, res, tmp)
    except Exception as exc:  # noqa: BLE001
        res.status, res.reason = "crash", f"{type(exc).__name__}: {exc}"
    return res
