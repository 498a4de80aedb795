"""Every cache kind, one architecture each: chat equals mlx-lm, every operation exact, measured or refused.

The whole zoo (every module of the installed mlx-lm) is bench/model_zoo.py;
this is one architecture per cache kind, a few seconds each.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from zoo_harness import check_arch, first_rows_error, logits_error

from kvscope.engine.caches.adopted import AdoptedCache
from kvscope.engine.caches.sliding import SlidingScopeKVCache
from kvscope.engine.engine import Engine
from kvscope.engine.errors import UnsupportedModelError
from kvscope.engine.generation import SamplingParams
from kvscope.engine.kv_cache import ScopeKVCache
from kvscope.engine.splicing import SpliceOptions
from tiny_models import make_zoo_model

# arch -> the verdicts a user must see for (mask, delete, splice)
KINDS = {
    "phi3": ("exact", "exact", "exact"),  # partial rotary
    "deepseek_v3": ("exact", "exact", "exact"),  # MLA: k_pe stored as the value tensor
    "deepseek_v2": ("exact", "exact", "exact"),  # MLA: k_pe is the tail of the key
    "gemma3_text": ("exact", "exact", "exact"),  # sliding window (over positions)
    "gemma4_text": ("exact", "exact", "exact"),  # shared-KV layers + sliding + partial rotary
    "qwen3_next": ("measured", "refused", "refused"),  # hybrid: gated delta-net + attention
    "mamba": ("refused", "refused", "refused"),  # recurrent state only
}


@pytest.mark.parametrize("arch", sorted(KINDS))
def test_each_cache_kind_chats_like_mlx_lm_and_every_operation_is_exact_measured_or_refused(
    arch: str, tmp_path: Path
) -> None:
    res = check_arch(arch, root=tmp_path)
    assert res.status == "ok", res.reason
    assert all(res.parity.values()), res.parity  # turn 1, turn 2, second session == mlx-lm greedy
    assert not res.crashes, res.crashes
    got = tuple(res.ops[op].split(" ")[0].rstrip(":") for op in ("mask", "delete", "splice"))
    assert got == KINDS[arch], res.ops
    assert res.ops["erratum"] == "exact"  # appending is a prefill on every kind


def test_quantized_hybrid_build_chats_like_mlx_lm_and_every_operation_is_exact_measured_or_refused(
    tmp_path: Path,
) -> None:
    res = check_arch("qwen3_next", bits=4, root=tmp_path)  # 4-bit weights; mlx-lm on the same 4-bit folder
    assert res.status == "ok" and all(res.parity.values()), (res.reason, res.parity)
    assert not res.crashes, res.crashes
    got = {op: v.split(" ")[0].rstrip(":") for op, v in res.ops.items()}
    assert got == {
        "mask": "measured",  # the states absorbed the masked tokens
        "delete": "refused",
        "splice": "refused",
        "replace": "refused",
        "erratum": "exact",
        "compress": "measured",  # the attention cache only; equals a recompute without the evicted rows
        "segment files": "refused",
        "persistence": "exact",  # export -> import continues like the never-saved session
    }, res.ops


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    eng = Engine()
    eng.load(make_zoo_model(tmp_path_factory.mktemp("zoo") / "qwen3_next", "qwen3_next"))
    return eng


def test_hybrid_layout_comes_from_the_model_and_state_layers_show_bytes_and_last_token(hybrid: Engine) -> None:
    lm = hybrid.model
    assert lm.layout is not None and dict(lm.layout.kinds) == {"recurrent": 3, "attention": 1}
    sid = hybrid.new_session()
    hybrid.chat(sid, "the code for locker seven is red", SamplingParams(max_tokens=4))
    s = hybrid.session(sid)
    states = [c for c in s.caches if isinstance(c, AdoptedCache)]
    assert len(states) == 3 and all(c.n_rows == 0 and c.nbytes > 0 for c in states)
    assert all(c.last_token_absorbed == s.n_tokens - 1 for c in states)
    assert "3 of 4 caches keep a recurrent state" in lm.support.verdict("mask").reason


def test_hybrid_next_turn_reuses_state_and_rows_with_logits_equal_to_a_recompute(hybrid: Engine) -> None:
    sid = hybrid.new_session()
    hybrid.chat(sid, "the code for locker seven is red", SamplingParams(max_tokens=6))
    r = hybrid.chat(sid, "and the other one", SamplingParams(max_tokens=6))
    assert r.stats.cached_tokens > 0 and r.stats.prefilled_tokens < r.stats.prompt_tokens
    assert logits_error(hybrid, sid) < 1e-4  # state + rows after two turns == recomputing every token


def test_a_refused_operation_leaves_the_session_byte_for_byte_unchanged(hybrid: Engine) -> None:
    from zoo_harness import _fingerprint

    sid = hybrid.new_session()
    hybrid.chat(sid, "the code for locker seven is red", SamplingParams(max_tokens=4))
    before = _fingerprint(hybrid, sid)
    for call in (
        lambda: hybrid.splice(sid, sid, 1, 4),
        lambda: hybrid.delete_span(sid, 1, 4),
        lambda: hybrid.save_segment(sid, 1, 4, "never-written.kvseg"),
    ):
        with pytest.raises(UnsupportedModelError, match=r"refused on qwen3_next: 3 of 4 caches are recurrent state"):
            call()
        assert _fingerprint(hybrid, sid) == before
    with pytest.raises(UnsupportedModelError, match=r"snapkv on qwen3_next is refused"):
        hybrid.compress(sid, "snapkv", keep_ratio=0.5)  # recomputes attention over every cache
    assert _fingerprint(hybrid, sid) == before


def test_recurrent_state_cannot_be_trimmed_past_its_checkpoints(hybrid: Engine) -> None:
    sid = hybrid.new_session()
    hybrid.chat(sid, "the code for locker seven is red blue green", SamplingParams(max_tokens=3))
    c = next(c for c in hybrid.session(sid).caches if isinstance(c, AdoptedCache))
    with pytest.raises(UnsupportedModelError, match="absorbed them"):
        c.trim(c.n_tokens - 2)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_mla_splice_matches_the_layer0_rows_of_a_recompute_and_the_unrotated_control_does_not(
    arch: str, tmp_path: Path
) -> None:
    eng = Engine()
    eng.load(make_zoo_model(tmp_path / arch, arch))
    rot = eng.model.rotations[0]
    assert rot.exact and (rot.tensor, rot.lo > 0) in (("values", False), ("keys", True))  # only k_pe rotates
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red blue green", SamplingParams(max_tokens=4))
    control = eng.duplicate_session(sid)
    eng.splice(sid, sid, 2, 8, SpliceOptions(fidelity=False))  # copied to the end: every row moves
    assert first_rows_error(eng, sid) < 1e-4
    eng.splice(control, control, 2, 8, SpliceOptions(fidelity=False, reposition=False))
    assert first_rows_error(eng, control) > 1e-2  # the check can fail: unrotated k_pe is far off


def test_sliding_window_is_over_positions_after_a_gap(tmp_path: Path) -> None:
    eng = Engine()
    eng.load(make_zoo_model(tmp_path / "g3", "gemma3_text"))
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red blue green and the name is", SamplingParams(max_tokens=4))
    s = eng.session(sid)
    c = next(c for c in s.caches if isinstance(c, SlidingScopeKVCache))
    assert c.n_rows == s.n_tokens > c.window  # every row kept; attention reads the window
    eng.delete_span(sid, 2, 6, shift=False, fidelity=False)  # a gap of 4 positions
    mask = np.array(c.make_mask(1, return_array=True))
    vis = c.token_positions[c.visible_tokens]
    k = vis[vis > c.offset - c.window]
    assert mask.shape == (1, len(k) + 1) and mask.all()
    assert len(k) + 1 <= c.window  # the window counts positions, not the rows left


def test_masking_some_sliding_layers_is_refused_before_anything_changes(tmp_path: Path) -> None:
    eng = Engine()
    eng.load(make_zoo_model(tmp_path / "g3", "gemma3_text"))
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red", SamplingParams(max_tokens=3))
    n_vis = [c.n_visible for c in eng.session(sid).caches]
    with pytest.raises(UnsupportedModelError, match="share one window mask|one window mask"):
        eng.mask(sid, 1, 3, layers=[0])
    assert [c.n_visible for c in eng.session(sid).caches] == n_vis
    eng.mask(sid, 1, 3, layers=[5, 11])  # the full-attention layers alone are fine


def test_shared_kv_model_gets_fewer_caches_than_layers(tmp_path: Path) -> None:
    eng = Engine()
    lm = eng.load(make_zoo_model(tmp_path / "g4", "gemma4_text"))
    assert lm.layout is not None and lm.layout.n_model_layers == 6 and lm.layout.n_caches == 4
    sid = eng.new_session()
    assert len(eng.session(sid).caches) == 4


def test_a_rope_that_is_not_one_rotation_per_position_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_zoo_model(tmp_path / "llama", "llama")
    original = nn.RoPE.__call__

    def stretched(self: nn.RoPE, x: mx.array, offset: int = 0) -> mx.array:  # positions past 64 drift
        return original(self, x, offset=offset + max(0, offset - 64) // 8)

    monkeypatch.setattr(nn.RoPE, "__call__", stretched)
    eng = Engine()
    lm = eng.load(folder)
    assert "not a pure rotation" in (lm.unsupported_reason or "")
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red", SamplingParams(max_tokens=3))
    n = eng.session(sid).n_tokens
    with pytest.raises(UnsupportedModelError, match="splice is refused on llama: cache 0"):
        eng.splice(sid, sid, 0, 2)
    assert eng.session(sid).n_tokens == n
    eng.mask(sid, 0, 2)  # masking moves nothing: still exact


def test_plain_models_still_use_scope_caches(tmp_path: Path) -> None:
    eng = Engine()
    eng.load(make_zoo_model(tmp_path / "llama", "llama"))
    sid = eng.new_session()
    assert all(type(c) is ScopeKVCache for c in eng.session(sid).caches)
    assert eng.model.support is not None and all(v.status == "exact" for v in eng.model.support.verdicts)


def test_a_quantized_model_reports_its_compute_dtype_not_the_packed_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from kvscope.app.cli import main
    from kvscope.engine.model_loading import compute_dtype

    folder = make_zoo_model(tmp_path / "q", "llama", bits=4)
    capsys.readouterr()  # mlx-lm's quantizer prints a line
    assert main(["info", "--model", str(folder), "--json"]) == 0  # what a user runs
    info = json.loads(capsys.readouterr().out)
    assert (info["dtype"], info["weights"]) == ("float32", "4-bit quantized (group 32)")  # the CPU computes in f32
    model = load(str(folder))[0]
    model.set_dtype(mx.bfloat16)  # as a bf16 checkpoint loads on a Mac
    assert any(v.dtype == mx.uint32 for _, v in tree_flatten(model.parameters()))  # packed weights
    assert compute_dtype(model, mx.Device(mx.gpu)) == "bfloat16"  # Metal keeps the checkpoint's dtype
    assert compute_dtype(model, mx.Device(mx.cpu)) == "float32"


def test_kvscope_info_prints_every_operation_with_its_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvscope.app.cli import main

    folder = make_zoo_model(tmp_path / "qwen3_next", "qwen3_next")
    assert main(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "3 recurrent state (SSM / linear attention), 1 full attention" in out
    lines = {
        ln.split()[0]: ln
        for ln in out.splitlines()[
            out.splitlines().index("cache operations on this model (exact / measured / refused):") + 1 :
        ]
        if ln.strip()
    }
    assert "measured" in lines["mask"] and "absorbed the masked tokens" in lines["mask"]
    assert "refused" in lines["splice"] and "exact" in lines["erratum"]


@pytest.mark.parametrize("arch", ["qwen3_next", "mamba"])
def test_a_new_session_reuses_a_recurrent_prefix_with_logits_equal_to_a_recompute(arch: str, tmp_path: Path) -> None:
    eng = Engine()
    eng.load(make_zoo_model(tmp_path / arch, arch))
    p = SamplingParams(max_tokens=12)  # longer than the trim checkpoints: the prefill end is pinned apart
    first = eng.new_session()
    r1 = eng.chat(first, "the code for locker seven is red blue green", p)
    second = eng.new_session()
    r2 = eng.chat(second, "the code for locker seven is red blue green", p)
    assert r2.stats.cached_tokens == r1.stats.prompt_tokens - 1 and r2.stats.prefilled_tokens == 1
    assert r2.token_ids == r1.token_ids
    assert logits_error(eng, second) < 1e-4
    third = eng.new_session()  # a different question after the same system + first words
    r3 = eng.chat(third, "the code for locker nine", p)
    assert r3.stats.cached_tokens == 0  # no stored prefix ends inside this prompt: prefilled in full
    assert logits_error(eng, third) < 1e-4


def test_recurrent_session_caches_round_trip_through_mlx_lm_prompt_cache_files(tmp_path: Path) -> None:
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from kvscope.engine.generation import forward

    eng = Engine()
    eng.load(make_zoo_model(tmp_path / "mamba", "mamba"))
    sid = eng.new_session()
    eng.chat(sid, "the code for locker seven is red", SamplingParams(max_tokens=4))
    caches = eng.session(sid).caches
    save_prompt_cache(str(tmp_path / "c.safetensors"), caches)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in caches] == ["ArraysCache"] * 2
    model = eng.model.model
    got = forward(model, [5], [c.copy() for c in caches])[0, -1]
    want = model(mx.array([[5]]), cache=loaded)[0, -1]
    assert float(mx.abs(got - want).max().item()) < 1e-5


def test_an_approximate_mask_is_labelled_so_in_its_fidelity_report(hybrid: Engine) -> None:
    sid = hybrid.new_session()
    hybrid.chat(sid, "the code for locker seven is red blue green", SamplingParams(max_tokens=4))
    rep = hybrid.mask(sid, 2, 6)
    assert "absorbed the masked tokens" in rep.extra["approximate"] and 0 < rep.cosine <= 1
    assert "approximate" in hybrid.session(sid).operations[-1]["report"]["extra"]
