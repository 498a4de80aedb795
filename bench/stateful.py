"""Long run of the engine state machine (tests/engine_machine.py) on tiny models.

Runs random sequences of real operations (turns, cancels, masks, deletes,
replaces, errata, compactions, splices, file splices, every compression
policy, undo, save/reopen) until `--steps` steps were checked, cycling through
the architectures, and prints the steps per rule and outcome. Any broken
invariant stops the run with hypothesis's shrunk example and exit code 1.

    python bench/stateful.py --steps 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings

import _common  # noqa: F401  - sys.path and BLAS preload
from engine_machine import EngineMachine, machine_for
from tiny_models import make_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000, help="stop after this many checked steps")
    p.add_argument("--archs", default="llama,qwen2,phi3")
    p.add_argument("--batch", type=int, default=20, help="cases per hypothesis run")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvscope-stateful-"))
    machines = [machine_for(make_tiny_model(root / a, a)) for a in args.archs.split(",")]
    per_arch = {m.__name__: 0 for m in machines}
    t0 = time.perf_counter()
    i = 0
    while EngineMachine.counts["steps checked"] < args.steps:
        m = machines[i % len(machines)]
        before = EngineMachine.counts["steps checked"]
        m.TestCase.settings = settings(
            max_examples=args.batch, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
        )
        m.TestCase().runTest()
        per_arch[m.__name__] += EngineMachine.counts["steps checked"] - before
        i += 1
        print(f"{EngineMachine.counts['steps checked']} steps checked ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("steps per architecture:", per_arch)
    print("steps per rule and outcome:", dict(EngineMachine.counts.most_common()))


if __name__ == "__main__":
    main()
