"""The linear probe finds a planted signal and sits at chance when there is none."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.lab.probe import heldout_predictions
from kvscope.lab.stats import accuracy


def test_probe_decodes_a_planted_digit_from_noisy_features() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 300)
    x = rng.normal(0, 1, (300, 64))
    x[:, :10] += 3.0 * np.eye(10)[y]  # the digit, one-hot, under noise
    acc = accuracy(list(heldout_predictions(x, y, 10) == y))
    assert acc.lo > 0.6


def test_probe_on_unrelated_labels_is_at_chance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (300, 256))  # more features than a fold's samples: easy to overfit
    y = rng.integers(0, 10, 300)
    acc = accuracy(list(heldout_predictions(x, y, 10) == y))
    assert acc.lo <= 0.1 <= acc.hi


def test_probe_refuses_too_few_samples_or_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="at least 10 samples"):
        heldout_predictions(np.zeros((6, 3)), np.zeros(6, int), 10)
    with pytest.raises(ValueError, match="n labels"):
        heldout_predictions(np.zeros((20, 3)), np.zeros(19, int), 10)
