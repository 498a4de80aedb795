"""Bad requests get OpenAI's error JSON with the right status; a client that leaves cancels its generation."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import start_server

from kvscope.engine.events import TokenSampled
from kvscope.server import Server
from kvscope.server.runner import Job

CHAT = [{"role": "user", "content": "What is the code for locker 7?"}]


def post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _is_openai_error(body: Any) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}


def test_error_shapes_and_statuses(demo_server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert nf.value.status_code == 404 and nf.value.code == "model_not_found" and "gpt-4o" in nf.value.message
    for kw, param in [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ]:
        args = {"model": "kvscope-demo", "messages": CHAT, **kw}
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**args)
        assert bad.value.status_code == 400 and bad.value.param == param, kw
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="kvscope-demo", messages=[{"role": "user", "content": "locker " * 5000}])
    assert long.value.code == "context_length_exceeded" and "4096" in long.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="kvscope-demo", messages=CHAT, max_tokens=5000, stream=True)
    assert too_many.value.code == "context_length_exceeded"  # a stream's bad prompt still gets its 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="kvscope-demo", prompt=[99999])
    status, body = post(demo_server, "/v1/chat/completions", b"{not json")
    assert status == 400 and _is_openai_error(body) and "JSON" in body["error"]["message"]
    status, body = post(demo_server, "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and _is_openai_error(body)
    status, body = post(demo_server, "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and _is_openai_error(body) and "nested" in body["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", demo_server.port)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(33 << 20))  # refused before the body is read
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and _is_openai_error(body) and "32 MB" in body["error"]["message"]
    status, body = post(demo_server, "/v1/nothing-here", b"{}")
    assert status == 404 and _is_openai_error(body)
    # After all that the server still answers.
    assert client.chat.completions.create(model="kvscope-demo", messages=CHAT, max_tokens=4).choices[0].message.content


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[Server]:
    server, worker = start_server(None, api_key="sk-right-key-123")
    yield server
    server.stop()
    worker.shutdown()


def test_api_key(keyed_server: Server) -> None:
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=keyed_server.base_url, api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError) as wrong:
        client("sk-wrong-key-456").chat.completions.create(model="kvscope-demo", messages=CHAT)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert "sk-right" not in wrong.value.message  # never echo the real key
    status, body = post(keyed_server, "/v1/chat/completions", b"{}")  # no Authorization header
    assert status == 401 and _is_openai_error(body) and "API key" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").models.list()
    assert [m.id for m in client("sk-right-key-123").models.list()] == ["kvscope-demo"]
    with urllib.request.urlopen(f"http://127.0.0.1:{keyed_server.port}/health") as r:
        assert json.loads(r.read())["status"] == "ok"  # health needs no key


@pytest.fixture(scope="module")
def tiny_server(llama_dir: Path) -> Iterator[Server]:
    server, worker = start_server(llama_dir, session_budget_bytes=300 * 2 * 2 * 2 * 16 * 4)
    yield server
    server.stop()
    worker.shutdown()


def _wait_done(server: Server, rid: int) -> Any:
    for _ in range(3000):  # a readiness wait on a shared machine, not a speed check
        rec = server.log.get(rid)
        if rec.status not in ("queued", "running"):
            return rec
        time.sleep(0.02)
    raise AssertionError(f"request {rid} never finished")


def test_disconnect_mid_stream_cancels_generation(tiny_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    sampled: list[int] = []  # tokens the engine sampled for the request (engine thread)
    at_cancel: list[int] = []  # how many it had when the server cancelled the job
    real_cancel = Job.cancel

    def cancel(job: Job) -> None:
        at_cancel.append(len(sampled))
        real_cancel(job)

    monkeypatch.setattr(Job, "cancel", cancel)
    unsubscribe = tiny_server.worker.engine.subscribe(
        lambda ev: sampled.append(ev.index) if isinstance(ev, TokenSampled) else None
    )
    client = openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0)
    try:
        stream = client.completions.create(
            model=tiny_server.model.id, prompt="once upon", max_tokens=3000, temperature=0, stream=True
        )
        got = [next(iter(stream)) for _ in range(3)]
        assert all(c.choices[0].text is not None for c in got)
        stream.close()  # the client goes away
        rid = max(r.id for r in tiny_server.log.all())
        rec = _wait_done(tiny_server, rid)
    finally:
        unsubscribe()
    # Greedy on this prompt runs 1382 tokens to its end-of-text; the client left after 3 chunks.
    assert rec.finish_reason == "cancelled" and rec.completion_tokens < 1382
    # Within one decode step of the cancel: at most the token being reported and the one in flight follow.
    assert at_cancel and rec.completion_tokens <= at_cancel[0] + 2, (at_cancel, rec.completion_tokens)
    # The engine is consistent and serves the next request.
    sid = rec.session
    rows, tokens = tiny_server.worker.call(lambda eng: (eng.session(sid).caches[0].n_rows, eng.session(sid).n_tokens))
    assert rows == tokens
    r = client.completions.create(model=tiny_server.model.id, prompt="the code", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


def test_sessions_are_retired_lru_unless_pinned(tiny_server: Server) -> None:
    client = openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0)
    first = client.completions.create(
        model=tiny_server.model.id, prompt="alpha beta gamma", max_tokens=40, temperature=0
    )
    rid = first.model_extra["kvscope"]["request_id"]
    status, _ = post(tiny_server, f"/kvscope/requests/{rid}/pin", b'{"pinned": true}')
    assert status == 200 and tiny_server.log.get(rid).pinned
    later = [
        client.completions.create(
            model=tiny_server.model.id, prompt=f"prompt number {i} " * 3, max_tokens=40, temperature=0
        )
        for i in range(6)
    ]
    live = set(tiny_server.worker.call(lambda eng: eng.sessions()))
    recs = [tiny_server.log.get(r.model_extra["kvscope"]["request_id"]) for r in later]
    assert first.model_extra["kvscope"]["session"] in live  # pinned: kept
    assert any(r.retired for r in recs) and all(r.session not in live for r in recs if r.retired)
    assert not recs[-1].retired  # the newest is kept; the oldest go first
    retired = [i for i, r in enumerate(recs) if r.retired]
    assert retired == list(range(len(retired)))
    status, body = post(tiny_server, "/kvscope/requests/99999/pin", b"{}")
    assert status == 404 and _is_openai_error(body)
