"""Random sequences of real engine operations keep every invariant (short budget).

The long run is `bench/stateful.py`; its case counts are in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from engine_machine import machine_for

SHORT = settings(
    max_examples=6,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,  # the suite must not depend on luck; the bench explores
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_random_operation_sequences_keep_every_invariant(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    machine = machine_for(tiny_model_dirs[arch])
    machine.TestCase.settings = SHORT
    machine.counts.clear()
    machine.TestCase().runTest()
    assert machine.counts["steps checked"] >= 150  # a few hundred steps over the two architectures
    assert machine.counts["applied"] and machine.counts["chat"]
