"""`kvscope serve` as a user starts it: a real subprocess on loopback, with --record and --api-key."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_subprocess_records_requests(tmp_path: Path) -> None:
    port, log = _free_port(), tmp_path / "requests.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "kvscope.app.cli",
        "serve",
        "--port",
        str(port),
        "--record",
        str(log),
        "--api-key",
        "k1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        for _ in range(3000):  # model load on a shared machine: a generous bounded wait, not a speed check
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        messages = [{"role": "user", "content": "What is the code for locker 7?"}]
        r = client.chat.completions.create(model="kvscope-demo", messages=messages, max_tokens=5, user="tester")
        assert r.usage.completion_tokens <= 5
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "kvscope serve: model kvscope-demo" in out
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 1
    assert lines[0]["messages"] == messages and lines[0]["max_tokens"] == 5
    assert lines[0]["agent"] == "tester" and lines[0]["ts"] > 0
    assert "step" not in lines[0]  # only a workflow step the client gave is recorded
    assert "k1" not in log.read_text()  # the key is never recorded
