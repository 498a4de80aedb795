"""kvscope serve through HTTP vs the engine directly, measured side by side in one run.

1. Decode tok/s: the same greedy prompts, streamed through `kvscope serve`
   (a subprocess, as users run it) with the official `openai` client
   (client-side clock, first to last content chunk) and run on the engine
   directly in this process (`prompt_turn.run_prompt`, the engine's own
   decode clock); never two at once. Two servers: the default stream
   interval (20 ms) and `--stream-interval 0` (one event per token, as
   before). Also the CPU each token costs outside the engine: the server's
   event-loop thread and the client (Linux /proc; on a 2-core machine that
   CPU is taken from the decode). Target >= 0.9.
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
from typing import NamedTuple

from _common import med, model_arg, resolve_model
from kvscope.engine import SamplingParams, chat
from kvscope.engine.prompt_turn import run_prompt
from kvscope.engine.worker import EngineWorker
from kvscope.lab.stats import bootstrap_ratio
from kvscope.server.replay import replay_file
from kvscope.server.samples import write_samples

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


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds (user + system) one thread of a process has used; 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HttpRun(NamedTuple):
    """One streamed request through a server."""

    tps: float  # decode tok/s on the client's clock
    loop_ms: float  # the server's event-loop CPU per token
    client_ms: float  # this process's (the client's) CPU per token
    engine_tps: float  # decode tok/s on the server engine's own clock


def http_decode_cpu(client, model: str, messages: list, max_tokens: int, pid: int) -> HttpRun:  # type: ignore[no-untyped-def]
    loop0, me0 = thread_cpu_s(pid, pid), time.process_time()
    tps, n, _, inside = http_decode(client, model, messages, max_tokens)
    loop1, me1 = thread_cpu_s(pid, pid), time.process_time()
    return HttpRun(tps, (loop1 - loop0) * 1000 / max(n, 1), (me1 - me0) * 1000 / max(n, 1), inside)


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
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    args = p.parse_args()
    path = resolve_model(args.model)
    worker = EngineWorker()
    worker.call(lambda eng: eng.load(path))
    servers = {label: start_server(path, ms) for label, ms in (("interval 20 ms", "20"), ("every token", "0"))}
    base_url = servers["interval 20 ms"][1]
    clients = {k: openai.OpenAI(base_url=u, api_key="x", max_retries=0) for k, (_, u) in servers.items()}
    client = clients["interval 20 ms"]
    model = worker.call(lambda eng: eng.model.name)
    print(f"model: {model}; {args.rounds} rounds x {len(LOOPY)} prompts x {args.max_tokens} tokens, medians")
    decode_side_by_side(worker, servers, clients, model, args.rounds, args.max_tokens)

    ttft_hit_miss(client, base_url, model, args.rounds, args.prefix_tokens)
    replay_throughput(worker)
    for proc, _ in servers.values():
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    worker.shutdown()


def ttft_hit_miss(client, base_url: str, model: str, rounds: int, prefix_tokens: int) -> None:  # type: ignore[no-untyped-def]
    """TTFT through HTTP of a request whose long system prompt is cached vs the same length behind a unique line."""
    system = FILLER * max(1, prefix_tokens // 17)
    client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "warm up"}],
        max_tokens=1,
    )
    hits, misses, cached = [], [], 0
    for i in range(rounds):
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


def replay_throughput(worker: EngineWorker) -> None:
    """Requests a second `kvscope replay` pushes through the tokenizer and the simulated store."""
    folder = Path(tempfile.mkdtemp(prefix="kvscope-replay-"))
    for log in write_samples(folder):
        t0 = time.perf_counter()
        report = worker.call(lambda eng, log=log: replay_file(eng.model, log, policies=("lru",)))
        dt = time.perf_counter() - t0
        print(
            f"replay {log.name}: {report.n_requests} requests in {dt:.2f} s = {report.n_requests / dt:.0f} requests/s"
        )


def decode_side_by_side(
    worker: EngineWorker, servers: dict, clients: dict, model: str, rounds: int, max_tokens: int
) -> None:  # type: ignore[type-arg]
    """Each prompt on the engine directly and through each server, back to back; ratios pair by pair."""
    direct: list[float] = []
    http: dict[str, list[HttpRun]] = {k: [] for k in servers}
    engine_decode(worker, LOOPY[0], 20)  # warm-up: first calls compile and allocate
    for side in servers:
        http_decode(clients[side], model, LOOPY[0], 20)
    for r in range(rounds):
        for i, messages in enumerate(LOOPY):
            sides = ["direct", *servers]
            k = (r * len(LOOPY) + i) % len(sides)
            for side in sides[k:] + sides[:k]:  # rotate who goes first
                if side == "direct":
                    direct.append(engine_decode(worker, messages, max_tokens)[0])
                else:
                    pid = servers[side][0].pid
                    http[side].append(http_decode_cpu(clients[side], model, messages, max_tokens, pid))
    print(f"decode tok/s, the engine directly: median {med(direct):.1f} (range {min(direct):.1f}-{max(direct):.1f})")
    for side, runs in http.items():
        pairs = sorted(r.tps / d for r, d in zip(runs, direct) if d > 0)
        engine_pairs = sorted(r.engine_tps / d for r, d in zip(runs, direct) if d > 0)
        both = bootstrap_ratio([r.tps for r in runs], direct)
        print(
            f"  HTTP, {side:>14}: {med([r.tps for r in runs]):6.1f} tok/s; HTTP/direct {both.value:.3f} "
            f"[{both.lo:.3f}-{both.hi:.3f}] (mean ratio, bootstrap 95% over {both.n} pairs); median of pairs "
            f"{med(pairs):.3f} (range {pairs[0]:.2f}-{pairs[-1]:.2f}); the server engine's "
            f"own clock / direct {med(engine_pairs):.3f}; CPU per token: server event loop "
            f"{med([r.loop_ms for r in runs]):.2f} ms, client {med([r.client_ms for r in runs]):.2f} ms"
        )


def get_json(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def start_server(model: str, stream_interval_ms: str = "20") -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kvscope.app.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--stream-interval", stream_interval_ms]
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
