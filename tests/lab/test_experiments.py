"""The head-to-head experiments run end to end on the demo model and count what they claim."""

from __future__ import annotations

import pytest

from kvscope.engine import Engine
from kvscope.engine.tasks import make_episodes
from kvscope.lab.experiments import erratum_vs_overwrite, mask_vs_restart


@pytest.fixture(scope="module")
def demo() -> Engine:
    eng = Engine()
    eng.load(None)
    return eng


def test_mask_vs_restart_counts_prefill_work(demo: Engine) -> None:
    eps = make_episodes("recall", 2, 384, 0.5, 3, demo.model.tokenizer)
    full, compact, restart = mask_vs_restart(demo, eps)
    assert full.n == compact.n == restart.n == 2
    # Compaction prefills only the summary and the question; the cached notes stay masked.
    assert compact.mean_prefilled < restart.mean_prefilled < eps[0].n_prompt_tokens
    assert demo.sessions() == []  # every episode's sessions were closed


def test_erratum_prefills_far_less_than_recompute(demo: Engine) -> None:
    eps = make_episodes("decision", 2, 384, 0.5, 3, demo.model.tokenizer)
    stale, err, over, full = erratum_vs_overwrite(demo, eps)
    assert {t.n for t in (stale, err, over, full)} == {2}
    assert err.mean_prefilled < full.mean_prefilled / 4
    assert over.mean_prefilled < full.mean_prefilled / 4
    # The demo model decides from the record: recomputing the corrected record
    # gives the new decision, leaving the cache uncorrected keeps the old one.
    assert full.accuracy == 1.0 and stale.accuracy == 0.0
    # Intervals and paired tests come from the same per-episode outcomes.
    assert full.accuracy_ci.n == 2 and full.accuracy_ci.lo < 1.0 == full.accuracy_ci.hi
    assert (stale.versus(full).only_a, stale.versus(full).only_b) == (0, 2)


def test_erratum_grades_the_values_it_is_given(demo: Engine) -> None:
    eps = make_episodes("decision", 1, 384, 0.5, 3, demo.model.tokenizer)
    same = eps[0].value
    assert same is not None
    # "Changing" the field to its current value: the stale cache is already right.
    stale, *_ = erratum_vs_overwrite(demo, eps, [same])
    assert stale.accuracy == 1.0
