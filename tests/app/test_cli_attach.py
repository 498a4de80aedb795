"""`kvscope attach` end to end: a real process against kvscope's publisher on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvscope.attach.fleet import prompt_tokens
from kvscope.attach.recording import read_recording
from kvscope.engine import demo_model_path
from kvscope.engine.kv_events import WireBlockRemoved, WireBlockStored
from kvscope.engine.kv_publisher import ZmqPublisher

PROMPT = "The code for locker 7 is 4821. Team Falcon meets in room 212, every day at noon."


def kvscope(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvscope.app.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def two_engines() -> tuple[ZmqPublisher, ZmqPublisher, list[int]]:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(demo_model_path())
    ids = prompt_tokens(tok, PROMPT)  # what a chat server sees: the template around the message
    assert len(ids) >= 8
    a = ZmqPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv@a")
    b = ZmqPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic="kv@b")
    # engine a holds two blocks of the prompt, engine b only the first (and something else)
    a.publish([WireBlockStored(("00000000000000a1", "00000000000000a2"), None, tuple(ids[:8]), 4)])
    b.publish([WireBlockStored(("00000000000000b1",), None, tuple(ids[:4]), 4)])
    b.publish([WireBlockStored(("00000000000000b2",), "00000000000000b1", (1, 2, 3, 4), 4)])
    b.publish([WireBlockRemoved(("00000000000000ff",))])  # never stored: counted
    assert a.flush() and b.flush()
    yield a, b, ids
    a.close()
    b.close()


def test_attach_two_engines_json_common_blocks_and_prefix_hits(
    two_engines: tuple[ZmqPublisher, ZmqPublisher, list[int]], tmp_path: Path
) -> None:
    a, b, _ids = two_engines
    rec = tmp_path / "rec.jsonl"
    r = kvscope(
        "attach", a.endpoint, b.endpoint, "--replay", str(a.replay_endpoint), str(b.replay_endpoint),
        "--topic", "kv@", "--until-blocks", "2", "--duration", "60", "--json", "-", "--record", str(rec),
        "--tokenizer", str(demo_model_path()), "--prompt", PROMPT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ea, eb = doc["engines"]
    assert [x["hash"] for x in ea["blocks"]] == ["00000000000000a1", "00000000000000a2"]
    assert ea["blocks"][1]["parent"] == "00000000000000a1" and ea["blocks"][0]["media"] == ["GPU"]
    assert ea["blocks"][0]["text"].startswith("<|im_start|>")  # token ids decoded with --tokenizer
    assert eb["counters"]["removed_unknown"] == 1 and eb["stream"]["lost"] == 0
    assert "blocks held by all 2 engines: 1" in r.stderr  # a1 and b1: the same tokens, different hashes
    hits = next(line for line in r.stderr.splitlines() if line.startswith("cached prefix"))
    assert hits.index(a.endpoint) < hits.index(b.endpoint) and f"{a.endpoint}: 8 tokens" in hits
    assert f"{b.endpoint}: 4 tokens" in hits
    assert "2 blocks (8 tokens)" in r.stderr  # the summary line
    assert read_recording(rec) == []  # everything came through replay; the recording holds live messages only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attach", "nonsense"], "cannot connect"),
        (["attach", "tcp://127.0.0.1:1", "--replay", "a", "b"], "more --replay"),
        (["attach", "tcp://127.0.0.1:1", "--prompt", "hi"], "needs --tokenizer"),
        (["attach", "tcp://127.0.0.1:1", "--tokenizer", "/nonexistent"], "not a model folder"),
        (["attach", "tcp://127.0.0.1:1", "--record", "/nonexistent/dir/rec"], "cannot write"),
    ],
)
def test_attach_bad_arguments_give_a_clear_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvscope.app.cli import main

    assert main([*args, "--duration", "0.1"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["chat", "gui", "serve"])
def test_kv_events_options_reach_the_engine_config(command: str) -> None:
    from kvscope.app.cli import build_parser
    from kvscope.app.common import kv_events_config
    from kvscope.engine import EngineConfig

    args = build_parser().parse_args(
        [command, "--kv-events", "tcp://127.0.0.1:5557", "--kv-events-replay", "tcp://127.0.0.1:5558"]
    )
    cfg = EngineConfig.from_dict(kv_events_config(args))
    assert (cfg.kv_events, cfg.kv_events_replay, cfg.kv_events_topic) == (
        "tcp://127.0.0.1:5557",
        "tcp://127.0.0.1:5558",
        "kv@kvscope",
    )
