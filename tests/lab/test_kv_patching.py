"""KV patching: the mechanics that make its shares mean something, on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvscope.engine import load_model
from kvscope.lab.chat_runs import feed, fresh_caches, token_rows, write_rows
from kvscope.lab.kv_patching import PatchConfig, run_patching


@pytest.fixture(scope="module")
def result(llama_dir: Path):  # type: ignore[no-untyped-def]
    return run_patching(load_model(llama_dir), PatchConfig(n=3, context=256))


def test_patching_every_differing_row_recovers_the_whole_logit_difference(result) -> None:  # type: ignore[no-untyped-def]
    assert len(result.outcomes) == 3
    for o in result.outcomes:
        # field + downstream in every layer = every row that differs: the counterfactual cache itself.
        assert o.ld["both, all layers"] == pytest.approx(o.ld["recompute (counterfactual)"], abs=1e-4)
        assert o.ld["recompute (counterfactual)"] != pytest.approx(o.ld["clean (no correction)"], abs=1e-4)
        # Layer 0's K/V of the tokens after the field depend on those tokens alone: patching them changes nothing.
        assert o.ld["downstream, layer 0"] == pytest.approx(o.ld["clean (no correction)"], abs=1e-4)
    rows = {r.condition: r for r in result.rows()}
    assert rows["both, all layers"].share.value == pytest.approx(1.0, abs=1e-4)
    assert rows["clean (no correction)"].share.value == 0.0
    assert rows["both, all layers"].share.n == 3


def test_write_rows_refuses_rows_at_other_positions(llama_dir: Path) -> None:
    lm = load_model(llama_dir)
    a, b = fresh_caches(lm), fresh_caches(lm)
    feed(lm, a, list(range(10, 30)))
    feed(lm, b, list(range(10, 31)))
    for c in b:
        c.evict_tokens(np.array([0]))  # token 0 evicted: the rest keep their positions
    write_rows(a, b, 5, 8, [0, 1])  # same tokens, same positions: allowed
    k_a, k_b = token_rows(a, 5, 8)[1][0], token_rows(b, 5, 8)[1][0]
    assert np.array_equal(k_a, k_b)
    with pytest.raises(ValueError, match="stored in both"):
        write_rows(a, b, 0, 3, [0])
    # Tokens 5..7 stored 10 positions later (as after a splice): their keys were rotated elsewhere.
    moved = fresh_caches(lm)
    feed(lm, moved, list(range(10, 15)))
    for c, src in zip(moved, a):
        keys, values, _, _ = src.rows_of(5, 8)
        c.insert_tokens(5, keys, values, np.arange(15, 18), np.ones(3, bool))
    with pytest.raises(ValueError, match="different positions"):
        write_rows(a, moved, 5, 8, [0])
