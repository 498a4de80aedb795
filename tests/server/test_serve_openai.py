"""kvscope serve, driven by the official `openai` client on the demo model.

Oracles: the engine's own greedy answer for the same chat (Engine.chat on a
fresh session), the tokenizer's own chat-template ids for where two prompts
diverge, and the non-streamed answer for the streamed one.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import openai

from kvscope.engine import SamplingParams
from kvscope.server import Server


def get_json(server: Server, path: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}") as r:
        return json.loads(r.read())


NOTES = (
    "You are kvscope-demo, a small assistant. Answer questions using the notes in this chat.\n"
    "Notes:\nThe code for locker 7 is 4821.\nThe colour of door 3 is green.\nThe owner of cart 5 is Mara."
)
ASK = "What is the code for locker 7?"


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _engine_greedy(server: Server, system: str, user: str, max_tokens: int = 40) -> str:
    def run(eng):  # type: ignore[no-untyped-def]
        sid = eng.new_session(system=system)
        try:
            return eng.chat(sid, user, SamplingParams(max_tokens=max_tokens)).text
        finally:
            eng.close_session(sid)

    return server.worker.call(run)


def test_chat_answers_like_the_engine_and_streams_the_same(demo_server: Server, client: openai.OpenAI) -> None:
    oracle = _engine_greedy(demo_server, NOTES, ASK)
    assert "4821" in oracle  # the demo model knows its notes
    r = client.chat.completions.create(model="kvscope-demo", messages=_chat(NOTES, ASK), temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == oracle
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 40 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="kvscope-demo",
            messages=_chat(NOTES, ASK),
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage is not None  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])
    # The same prompt again: everything but the last partial block comes from the prefix store.
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16


def test_second_request_sharing_a_prefix_reports_cached_tokens(demo_server: Server, client: openai.OpenAI) -> None:
    system = "The size of box 9 is large.\n" + NOTES
    a = client.chat.completions.create(model="kvscope-demo", messages=_chat(system, ASK), temperature=0, max_tokens=20)
    b = client.chat.completions.create(
        model="kvscope-demo", messages=_chat(system, "What is the colour of door 3?"), temperature=0, max_tokens=20
    )
    assert a.usage.prompt_tokens_details.cached_tokens == 0  # a new system prompt
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0
    ext = b.model_extra["kvscope"]
    assert ext["prefilled_tokens"] == b.usage.prompt_tokens - cached
    assert ext["prefix_break"]["closest_request"] == ext["request_id"] - 1


def test_agent_loop_cached_tokens_grow(demo_server: Server, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are agent seven.\n" + NOTES}]
    questions = [ASK, "What is the colour of door 3?", "Who is the owner of cart 5?"]
    prompts, cached = [], []
    for step in range(20):
        messages.append({"role": "user", "content": questions[step % 3]})
        r = client.chat.completions.create(
            model="kvscope-demo", messages=messages, temperature=0, max_tokens=12, user="agent-7"
        )
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        prompts.append(r.usage.prompt_tokens)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        assert r.model_extra["kvscope"]["name"] == f"agent-7 #{step + 1}"
    assert cached[0] == 0
    for i in range(1, 20):  # the whole previous prompt (its full blocks) was reused
        assert cached[i] >= prompts[i - 1] - prompts[i - 1] % 16, (i, cached, prompts)
    assert cached[-1] > cached[1]


def test_changed_time_in_system_prompt_is_explained_at_the_right_token(
    demo_server: Server, client: openai.OpenAI
) -> None:
    def system(clock: str) -> str:
        return f"Current time: 2026-12-07 {clock} UTC.\n" + NOTES

    first = client.chat.completions.create(
        model="kvscope-demo", messages=_chat(system("10:41:07"), ASK), temperature=0, max_tokens=8
    )
    second = client.chat.completions.create(
        model="kvscope-demo", messages=_chat(system("10:42:13"), ASK), temperature=0, max_tokens=8
    )
    tok_ids = demo_server.worker.call(
        lambda eng: [
            eng.model.tokenizer.apply_chat_template(_chat(system(c), ASK), add_generation_prompt=True)
            for c in ("10:41:07", "10:42:13")
        ]
    )
    a, b = tok_ids
    expected = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    why = second.model_extra["kvscope"]["prefix_break"]
    assert why["cause"] == "timestamp" and why["where"] == "the system prompt"
    assert why["diverged_at"] == expected and why["closest_request"] == first.model_extra["kvscope"]["request_id"]
    assert why["cached_tokens"] == second.usage.prompt_tokens_details.cached_tokens == expected - expected % 16
    assert why["lost_tokens"] > 0 and why["lost_ms"] > 0
    assert "timestamp" not in why["message"] and "time" in why["message"]  # a sentence, not a code
    # The same explanation over kvscope's own endpoint.
    rid = second.model_extra["kvscope"]["request_id"]
    assert get_json(demo_server, f"/kvscope/requests/{rid}")["prefix_break"] == why


def test_stop_strings_cut_the_answer_streamed_or_not(demo_server: Server, client: openai.OpenAI) -> None:
    oracle = _engine_greedy(demo_server, NOTES, ASK)
    cut = oracle[: oracle.index(" is ")]
    r = client.chat.completions.create(
        model="kvscope-demo", messages=_chat(NOTES, ASK), temperature=0, max_tokens=40, stop=[" is "]
    )
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="kvscope-demo", messages=_chat(NOTES, ASK), temperature=0, max_tokens=40, stop=" is ", stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_completions_text_and_token_ids(demo_server: Server, client: openai.OpenAI) -> None:
    prompt = "<|im_start|>user\nWhat is the code for locker 7?<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model="kvscope-demo", prompt=prompt, temperature=0, max_tokens=30)
    assert r.object == "text_completion" and r.choices[0].text
    ids = demo_server.worker.call(lambda eng: eng.model.tokenizer.encode(prompt))
    by_ids = client.completions.create(model="kvscope-demo", prompt=ids, temperature=0, max_tokens=30)
    assert by_ids.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model="kvscope-demo", prompt=prompt, temperature=0, max_tokens=30, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seeded_sampling_repeats(demo_server: Server, client: openai.OpenAI) -> None:
    kw = {
        "model": "kvscope-demo",
        "messages": _chat(NOTES, "Say something."),
        "max_tokens": 16,
        "temperature": 1.5,
        "top_p": 0.9,
    }
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b


def test_concurrent_requests_each_get_their_own_answer(demo_server: Server, client: openai.OpenAI) -> None:
    questions = [ASK, "What is the colour of door 3?", "Who is the owner of cart 5?"] * 2
    alone = [_engine_greedy(demo_server, NOTES, q, 24) for q in questions[:3]] * 2
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.chat.completions.create(
            model="kvscope-demo", messages=_chat(NOTES, questions[i]), temperature=0, max_tokens=24
        )
        got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(questions))] == alone


def test_models_and_health(demo_server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["kvscope-demo"]
    assert client.models.retrieve("kvscope-demo").owned_by == "kvscope"
    h = get_json(demo_server, "/health")
    assert h["status"] == "ok" and h["model"] == "kvscope-demo"
