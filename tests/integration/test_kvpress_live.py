"""The kvpress fixture is still what kvpress computes (marker `kvpress`).

Runs `tools/kvpress_runner.py` with the kvpress venv's python on the
fixture's episode and compares its decisions and answers with
`tests/fixtures/kvpress-0.5.5-decisions.json`, which the default suite
(tests/engine/test_kvpress_decisions.py) holds kvscope to. Skipped unless
`.ci/kvpress_integration.sh` runs it (it sets KVSCOPE_KVPRESS_PYTHON).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "kvpress-0.5.5-decisions.json"
PY = os.environ.get("KVSCOPE_KVPRESS_PYTHON", "")
pytestmark = [
    pytest.mark.kvpress,
    pytest.mark.skipif(not PY, reason="needs the kvpress venv: run .ci/kvpress_integration.sh"),
]


def test_kvpress_still_makes_the_recorded_decisions(tmp_path: Path) -> None:
    fixture = json.loads(FIXTURE.read_text())
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(fixture["episodes"]))
    out = tmp_path / "kvpress.jsonl"
    cmd = [PY, str(ROOT / "tools" / "kvpress_runner.py"), str(episodes), str(out)]
    subprocess.run([*cmd, "--modes", "context", "--ratios", "0.5", "--masks-for", "1"], check=True, cwd=ROOT)
    live = {r["press"]: r for r in map(json.loads, out.read_text().splitlines())}
    recorded = {r["press"]: r for r in fixture["records"]}
    assert set(live) == set(recorded)
    for press, r in recorded.items():
        assert live[press]["kept"] == r["kept"], f"kvpress's {press} now keeps other rows than the fixture says"
        assert live[press]["generated"] == r["generated"], f"kvpress's {press} now answers otherwise"
    version = subprocess.run(
        [PY, "-c", "import importlib.metadata as m; print(m.version('kvpress'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == fixture["kvpress"]
