"""kvscope serve through HTTP vs the engine directly, measured side by side in one run.

1. Decode tok/s: the same greedy prompts, streamed through `kvscope serve`
   (a subprocess, as users run it) with the official `openai` client
   (client-side clock, first to last content chunk) and run on the engine
   directly in this process (`prompt_turn.run_prompt`, the engine's own
   decode clock); the two never run at once. Target >= 0.9.
2. TTFT through HTTP of a prefix-hit request / a miss: a long shared system
   prompt with a new question vs the same length behind a unique first line.
3. Replay throughput: requests a second `kvscope replay` pushes through the
   tokenizer and the simulated prefix store (no model forward pass).

Rounds interleave the sides; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from _common import med, model_arg, resolve_model
from kvscope.engine import SamplingParams, chat
from kvscope.engine.prompt_turn import run_prompt
from kvscope.engine.worker import EngineWorker

NOTES = "Notes:\nThe code for locker 7 is 4821.\nThe colour of door 3 is green.\nThe owner of cart 5 is Mara."
LOOPY = [  # chats the demo model answers at length (it loops on an unfamiliar question)
    [
        {"role": "user", "content": NOTES},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": q},
    ]
    for q in ("What is the colour of door 3?", "What is the colour of door 9?", "What is the phone extension of Talia?")
]
FILLER = "the locker code report lists rooms colours names numbers and the notes of the day. "


def http_decode(client, model: str, messages: list, max_tokens: int) -> tuple[float, int, float, float]:  # type: ignore[no-untyped-def]
    """(client-side decode tok/s, tokens, TTFT ms, the server engine's own decode tok/s) of one streamed request."""
    t0 = time.perf_counter()
    stamps, n, inside = [], 0, 0.0
    for c in client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if c.choices and c.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if c.usage is not None:
            n = c.usage.completion_tokens
        if c.model_extra and c.model_extra.get("kvscope"):
            inside = c.model_extra["kvscope"]["decode_tps"]
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    # Chunks carry whole detokenized pieces; the token count comes from usage.
    return ((n - 1) / span if span > 0 else 0.0), n, (stamps[0] - t0) * 1000, inside


def engine_decode(worker: EngineWorker, messages: list, max_tokens: int) -> tuple[float, int]:
    def run(eng):  # type: ignore[no-untyped-def]
        ids = chat.first_turn_ids(eng.model.tokenizer, messages)
        sid = eng.new_session()
        try:
            r = run_prompt(eng, sid, ids, SamplingParams(max_tokens=max_tokens), messages, "", lambda: False)
            return r.stats.decode_tps, r.stats.n_generated
        finally:
            eng.close_session(sid)

    return worker.call(run)


def main() -> None:
    import openai

    p = argparse.ArgumentParser(description=__doc__)
    model_arg(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    args = p.parse_args()
    path = resolve_model(args.model)
    worker = EngineWorker()
    worker.call(lambda eng: eng.load(path))
    server, base_url = start_server(path)
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    model = worker.call(lambda eng: eng.model.name)
    print(f"model: {model}; {args.rounds} rounds, medians")

    http_tps, eng_tps, inside_tps, counts = [], [], [], []
    for _ in range(args.rounds):
        for messages in LOOPY:
            tps, n, _ttft, inside = http_decode(client, model, messages, args.max_tokens)
            e_tps, e_n = engine_decode(worker, messages, args.max_tokens)
            http_tps.append(tps)
            inside_tps.append(inside)
            eng_tps.append(e_tps)
            counts.append((n, e_n))
    h, e = med(http_tps), med(eng_tps)
    pairs = sorted(a / b for a, b in zip(http_tps, eng_tps) if b > 0)  # each pair ran back to back
    print(
        f"decode tok/s: HTTP {h:.1f}  engine {e:.1f}  HTTP/engine median of pairs {med(pairs):.3f} "
        f"(range {pairs[0]:.2f}-{pairs[-1]:.2f}, {len(pairs)} pairs; tokens per answer {counts[:3]})"
    )
    inner = sorted(a / b for a, b in zip(inside_tps, eng_tps) if b > 0)
    print(
        f"  the server's engine clock: {med(inside_tps):.1f} tok/s; server engine/direct engine median of pairs "
        f"{med(inner):.3f} (range {inner[0]:.2f}-{inner[-1]:.2f})"
    )

    system = FILLER * max(1, args.prefix_tokens // 17)
    client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "warm up"}],
        max_tokens=1,
    )
    hits, misses, cached = [], [], 0
    for i in range(args.rounds):
        q = [{"role": "user", "content": f"Question {i}: which room?"}]
        _, _, t_hit, _ = http_decode(client, model, [{"role": "system", "content": system}, *q], 1)
        unique = f"Run {uuid.uuid4().hex}.\n" + system
        _, _, t_miss, _ = http_decode(client, model, [{"role": "system", "content": unique}, *q], 1)
        hits.append(t_hit)
        misses.append(t_miss)
        log = get_json(base_url.replace("/v1", "/kvscope/requests"))["data"]
        cached, prompt = log[-2]["cached_tokens"], log[-2]["prompt_tokens"]
    hm, mm = med(hits), med(misses)
    print(
        f"TTFT through HTTP, {prompt}-token prompt: hit {hm:.1f} ms ({cached} cached)  miss {mm:.1f} ms  "
        f"hit/miss {hm / mm:.3f}  speed-up {mm / hm:.1f}x"
    )

    try:
        from kvscope.server.replay import replay_file
        from kvscope.server.samples import write_samples
    except ImportError:
        pass
    else:
        folder = Path(tempfile.mkdtemp(prefix="kvscope-replay-"))
        logs = write_samples(folder)
        tok = worker.call(lambda eng: eng.model.tokenizer)
        for log in logs:
            t0 = time.perf_counter()
            report = worker.call(lambda eng, log=log: replay_file(eng.model, log, policies=("lru",)))
            dt = time.perf_counter() - t0
            print(
                f"replay {log.name}: {report.n_requests} requests in {dt:.2f} s = {report.n_requests / dt:.0f} requests/s"
            )
        del tok
    server.send_signal(signal.SIGINT)
    server.wait(60)
    worker.shutdown()


def get_json(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def start_server(model: str) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kvscope.app.cli", "serve", "--model", model, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    while True:
        try:
            get_json(f"http://127.0.0.1:{port}/health")
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("kvscope serve did not start") from None
            time.sleep(0.1)


if __name__ == "__main__":
    main()
