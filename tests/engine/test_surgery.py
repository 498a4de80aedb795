"""Splice, delete, erratum and undo against full recomputes (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kvscope.engine import Engine, InvalidRequestError, SamplingParams
from kvscope.engine.errors import BusyError
from kvscope.engine.generation import forward
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.splicing import SpliceOptions
from tiny_models import make_tiny_model

# Repositioning multiplies by cos/sin read off the model's RoPE: float32
# rounding grows with the angle; 1e-4 holds for positions < ~2000.
KEY_ATOL = 1e-4


def _layer0_keys_of_recompute(eng: Engine, tokens: list[int]) -> np.ndarray:
    caches = [ScopeKVCache() for _ in range(eng.model.n_layers)]
    forward(eng.model.model, tokens, caches)
    return np.array(caches[0].state[0])


def _layer0_keys(eng: Engine, sid: str) -> np.ndarray:
    c = eng.session(sid).caches[0]  # type: ignore[arg-type]
    return np.array(c.state[0])


def _engine_with(arch_dir: Path) -> Engine:
    eng = Engine()
    eng.load(arch_dir)
    return eng


def test_splice_at_end_repositions_keys_exactly(arch_dir: Path) -> None:
    eng = _engine_with(arch_dir)
    a = eng.new_session("segment")
    eng.append_message(a, "user", "the code for locker 7 is 4 8 2 1 . the colour is red")
    b = eng.new_session("context")
    eng.append_message(b, "user", "you are a code locker . " * 8)
    n_a, n_b = eng.session(a).n_tokens, eng.session(b).n_tokens
    rep = eng.splice(b, a, 0, n_a)
    s = eng.session(b)
    assert s.n_tokens == n_a + n_b
    assert s.positions == list(range(n_a + n_b))
    assert s.caches[0].offset == n_a + n_b
    want = _layer0_keys_of_recompute(eng, s.tokens)
    np.testing.assert_allclose(_layer0_keys(eng, b), want, atol=KEY_ATOL)
    assert rep.extra["delta"] == n_b
    assert 0.0 <= rep.top1_agree <= 1.0 and rep.recompute_ms > 0


def test_splice_in_the_middle_moves_later_rows(arch_dir: Path) -> None:
    eng = _engine_with(arch_dir)
    a = eng.new_session()
    eng.append_message(a, "user", "red blue green")
    b = eng.new_session()
    eng.append_message(b, "user", "the code for locker 7 is 4 8 2 1 . the water is hot")
    n_a, n_b = eng.session(a).n_tokens, eng.session(b).n_tokens
    eng.splice(b, a, 1, n_a - 1, SpliceOptions(at=5))
    s = eng.session(b)
    assert s.n_tokens == n_b + n_a - 2
    assert s.positions == list(range(s.n_tokens))
    np.testing.assert_allclose(_layer0_keys(eng, b), _layer0_keys_of_recompute(eng, s.tokens), atol=KEY_ATOL)
    assert s.origin[5 : 5 + n_a - 2] == [4] * (n_a - 2)  # TokenState.SPLICED


def _segment_and_context(llama_dir: Path) -> tuple[Engine, str, str]:
    """An engine with session a (the segment to move) and session b (the new context)."""
    eng = _engine_with(llama_dir)
    a = eng.new_session()
    eng.append_message(a, "user", "the code for locker 7 is 4 8 2 1")
    b = eng.new_session()
    eng.append_message(b, "user", "you are a code locker . " * 4)
    return eng, a, b


def test_seam_repair_of_the_whole_segment_equals_recompute(llama_dir: Path) -> None:
    eng, a, b = _segment_and_context(llama_dir)
    n_a = eng.session(a).n_tokens
    raw = eng.splice(b, a, 0, n_a, SpliceOptions(seam_repair=0))
    eng.undo(b)
    repaired = eng.splice(b, a, 0, n_a, SpliceOptions(seam_repair=n_a))
    assert repaired.kl < 1e-6 and repaired.top1_agree == 1.0
    assert repaired.cosine > 0.99999
    assert raw.kl > repaired.kl  # the unrepaired splice really differs (the test can fail)


def test_without_repositioning_keys_are_wrong(llama_dir: Path) -> None:
    eng, a, b = _segment_and_context(llama_dir)
    seg = eng.session(a)
    from kvscope.engine.surgery import extract_segment

    eng.splice_segment(b, extract_segment(seg, 0, seg.n_tokens), SpliceOptions(reposition=False))
    s = eng.session(b)
    err = np.abs(_layer0_keys(eng, b) - _layer0_keys_of_recompute(eng, s.tokens)).max()
    assert err > 1e-2


def test_delete_with_and_without_shift(arch_dir: Path) -> None:
    eng = _engine_with(arch_dir)
    sid = eng.new_session()
    eng.append_message(sid, "user", "the code for locker 7 is 4 8 2 1 . the water is hot")
    s = eng.session(sid)
    n = s.n_tokens
    toks = list(s.tokens)
    eng.delete_span(sid, 4, 9, shift=True)
    assert s.tokens == toks[:4] + toks[9:]
    assert s.positions == list(range(n - 5)) and s.caches[0].offset == n - 5
    np.testing.assert_allclose(_layer0_keys(eng, sid), _layer0_keys_of_recompute(eng, s.tokens), atol=KEY_ATOL)
    eng.undo(sid)
    eng.delete_span(sid, 4, 9, shift=False)
    assert s.positions == list(range(4)) + list(range(9, n))
    assert s.caches[0].offset == n


def test_erratum_prefills_only_its_tokens_and_is_exact(llama_dir: Path) -> None:
    eng = _engine_with(llama_dir)
    sid = eng.new_session(system="you are a code locker")
    eng.chat(sid, "status : blocked . may I go ?", SamplingParams(max_tokens=4))
    n = eng.session(sid).n_tokens
    rep = eng.erratum(sid, "[update] status -> open")
    s = eng.session(sid)
    assert rep.extra["prefilled_tokens"] == s.n_tokens - n
    assert set(s.origin[n:]) == {6}  # TokenState.ERRATUM
    assert rep.kl < 1e-6 and rep.top1_agree == 1.0  # append-only: nothing stale


def test_undo_restores_exactly_and_ends_with_next_turn(llama_dir: Path) -> None:
    eng = _engine_with(llama_dir)
    sid = eng.new_session()
    eng.chat(sid, "the code for locker 7 is 4 8 2 1 . what is it ?", SamplingParams(max_tokens=3))
    s = eng.session(sid)
    before = (list(s.tokens), np.array(s.caches[1].state[0]), s.caches[1].n_visible)
    eng.mask(sid, 2, 8)
    assert s.caches[1].n_visible == before[2] - 6
    assert eng.undo(sid) == "mask"
    assert s.tokens == before[0] and s.caches[1].n_visible == before[2]
    assert np.array_equal(np.array(s.caches[1].state[0]), before[1])
    eng.mask(sid, 2, 8)
    eng.chat(sid, "and now ?", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="nothing to undo"):
        eng.undo(sid)


def test_bad_spans_are_refused_and_change_nothing(llama_dir: Path) -> None:
    eng = _engine_with(llama_dir)
    sid = eng.new_session()
    eng.append_message(sid, "user", "the code for locker 7")
    s = eng.session(sid)
    state = (list(s.tokens), s.caches[0].n_visible)
    for lo, hi, msg in [(3, 3, "empty span"), (5, 2, "empty span"), (-1, 2, "out of range"), (0, 999, "out of range")]:
        with pytest.raises(InvalidRequestError, match=msg):
            eng.mask(sid, lo, hi)
    with pytest.raises(InvalidRequestError, match="out of range"):
        eng.splice(sid, sid, 0, 2, SpliceOptions(at=999))
    with pytest.raises(InvalidRequestError, match="layers"):
        eng.mask(sid, 0, 2, layers=[7])
    assert (list(s.tokens), s.caches[0].n_visible) == state
    s.generating = True
    with pytest.raises(BusyError, match="generating"):
        eng.mask(sid, 0, 2)
    s.generating = False


def test_yarn_rope_is_probed_composable_and_splices_exactly(tmp_path: Path) -> None:
    # YaRN scales every position's magnitude by the same mscale and rotates by fixed
    # frequencies, so R(p + d) = R(d) R(p) holds; the load-time probe measures it
    # (tests/engine/test_architectures.py has a RoPE that is refused).
    from zoo_harness import first_rows_error

    folder = make_tiny_model(tmp_path / "yarn", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}
    (folder / "config.json").write_text(json.dumps(cfg))
    eng = _engine_with(folder)
    assert eng.model.unsupported_reason is None and eng.model.rope and eng.model.rope.kind == "YarnRoPE"
    sid = eng.new_session()
    eng.append_message(sid, "user", "the code for locker 7 is 4 8 2 1")
    eng.splice(sid, sid, 0, 4, SpliceOptions(fidelity=False))
    assert first_rows_error(eng, sid) < 1e-4  # spliced rows == a recompute at their new positions


def test_compact_masks_span_and_restart_starts_fresh(llama_dir: Path) -> None:
    eng = _engine_with(llama_dir)
    sid = eng.new_session(system="you are a code locker")
    eng.append_message(sid, "user", "the code for locker 7 is 4 8 2 1 . " * 3)
    n = eng.session(sid).n_tokens
    rep = eng.compact(sid, 5, n - 2, summary="locker 7 code 4821")
    s = eng.session(sid)
    assert s.n_tokens > n and s.caches[0].n_visible == s.n_tokens - (n - 2 - 5)
    assert rep.extra["summary_tokens"] > 0
    new = eng.restart(sid, "locker 7 code 4821")
    t = eng.session(new)
    assert t.messages[0]["role"] == "system" and "4821" in t.messages[-1]["content"]
    assert t.n_tokens < s.n_tokens
    generated = eng.compact(sid, 0, 3)  # summary written by the model itself
    assert generated.extra["summary"]
    _ = mx  # keep import for type checkers
