"""The invariant checker: the positions repro, and planted faults it must catch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvscope.engine import Engine, SamplingParams
from kvscope.engine.invariants import InvariantError, check_sessions, logits_vs_recompute, session_problems

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


def _assert_positions_owned_by_the_cache(eng: Engine, sid) -> None:
    s = eng.session(sid)
    for c in s.caches:
        # every stored row sits at its token's recorded position, and nothing repeats
        assert c.row_position.tolist() == [s.positions[t] for t in c.row_token]
        assert len(set(s.positions)) == len(s.positions)
    check_sessions([s], eng.store)


def test_generated_tokens_sit_at_their_recorded_positions() -> None:
    """The repro of the drift: after a turn, layer 0's rows and the session's positions agree."""
    eng = Engine()
    eng.load(None)  # the demo model
    a = eng.new_session("a")
    eng.chat(a, "Notes:\nThe code for locker 7 is 4821.", GREEDY)
    s = eng.session(a)
    assert s.positions == list(range(s.n_tokens))
    assert s.caches[0].row_position.tolist() == s.positions
    _assert_positions_owned_by_the_cache(eng, a)
    eng.chat(a, "What is the code for locker 7?", GREEDY)  # the next turn recorded a duplicate before
    assert eng.session(a).positions == list(range(eng.session(a).n_tokens))
    _assert_positions_owned_by_the_cache(eng, a)


@pytest.fixture()
def chatted(llama_dir: Path) -> tuple[Engine, object]:
    eng = Engine()
    eng.load(llama_dir)
    sid = eng.new_session("x", system="you are a code locker .")
    eng.chat(sid, "what is the code ?", SamplingParams(max_tokens=6))
    check_sessions([eng.session(sid)], eng.store)
    return eng, sid


def test_a_position_off_by_one_in_one_layer_is_caught(chatted) -> None:
    eng, sid = chatted
    s = eng.session(sid)
    s.caches[1]._pos[5] += 1  # plant: layer 1 books token 5 one position late
    with pytest.raises(InvariantError, match="layer 1 puts token 5 at another position"):
        check_sessions([s], eng.store)


def test_an_offset_off_by_one_is_caught(chatted) -> None:
    eng, sid = chatted
    s = eng.session(sid)
    s.caches[0]._offset += 1  # plant: the next token would be rotated one position late
    assert any("offset" in p and "not one past the last position" in p for p in session_problems(s))


def test_positions_off_by_one_in_every_layer_are_caught_by_the_recompute_oracle() -> None:
    """Structurally consistent but wrong: the keys were rotated elsewhere, so the oracle disagrees.

    On the demo model: a random tiny model attends almost uniformly and barely notices a position.
    """
    eng = Engine()
    eng.load(None)
    sid = eng.new_session("x")
    eng.chat(sid, "Notes:\nThe code for locker 7 is 4821.", SamplingParams(max_tokens=4))
    s = eng.session(sid)
    probe = s.tokens[-2:]
    got, want = logits_vs_recompute(eng.model, s, probe)
    np.testing.assert_allclose(got, want, atol=1e-4)
    for c in s.caches:
        c._pos[c.n_tokens - 3 : c.n_tokens] += (
            1  # plant: the last three tokens booked one position later than their keys
        )
        c._sync_offset()
    assert session_problems(s) == []
    got, want = logits_vs_recompute(eng.model, s, probe)
    assert np.abs(got - want).max() > 1e-3


def test_a_token_count_mismatch_is_caught(chatted) -> None:
    eng, sid = chatted
    s = eng.session(sid)
    s.tokens.append(s.tokens[-1])  # plant: the session books a token no cache received
    assert any("has seen" in p for p in session_problems(s))


def test_a_stale_prefix_store_reference_is_caught(chatted) -> None:
    eng, sid = chatted
    blocks = eng.store.blocks()
    if not blocks:
        pytest.skip("the prompt filled no full block")
    blocks[0].sessions.add("s999")  # plant: a closed session still holds a block
    with pytest.raises(InvariantError, match="held by closed sessions"):
        check_sessions([eng.session(sid)], eng.store)
