"""The prefix-break explainer on known edits, with one token per character (so the expected
token index is the character index) and a plain `role: content` chat rendering."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from kvscope.server.explain import EarlierPrompt, explain


def render(messages: Sequence[dict[str, str]], tools: Any = None) -> list[int]:
    text = (f"tools: {json.dumps(tools)}\n" if tools else "") + "".join(
        f"{m['role']}: {m['content']}\n" for m in messages
    )
    return [ord(c) for c in text + "assistant: "]


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def run(old: list[dict[str, str]], new: list[dict[str, str]], cached: int | None = None, tools=(None, None), answer=""):  # type: ignore[no-untyped-def]
    a, b = render(new, tools[1]), render(old, tools[0]) + [ord(c) for c in answer]  # its session: prompt + answer
    prior = EarlierPrompt(1, tuple(b), tuple(old), tools[0], answer)
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    cached = common - common % 16 if cached is None else cached
    return explain(a, new, tools[1], cached, 16, [prior], decode, 0.5), common


SYS = "You are a helpful agent with a long and stable system prompt."


@pytest.mark.parametrize(
    ("old", "new", "cause"),
    [
        (f"{SYS} Request id a81f3c9e2b.", f"{SYS} Request id 5be0d41f7a.", "random_id"),
        (f"{SYS} Today is 2026-12-06.", f"{SYS} Today is 2026-12-07.", "date"),
        (f"{SYS} It is 09:59 now.", f"{SYS} It is 10:03 now.", "timestamp"),
        (f"{SYS} Step 41 of the plan.", f"{SYS} Step 42 of the plan.", "counter"),
        (f"{SYS}  Be brief.", f"{SYS} Be brief.", "whitespace"),
        (f'{SYS} State: {{"a": 1, "b": 2}}', f'{SYS} State: {{"b": 2, "a": 1}}', "reordered"),
        (f"{SYS} Be brief.", f"{SYS} Be verbose and kind.", "system_prompt"),
    ],
)
def test_causes_in_the_system_prompt(old: str, new: str, cause: str) -> None:
    user = {"role": "user", "content": "go on with the task please"}
    why, common = run([{"role": "system", "content": old}, user], [{"role": "system", "content": new}, user])
    assert why.cause == cause, why.message
    assert why.diverged_at == common and why.where == "the system prompt"
    assert why.lost_tokens > 0 and why.lost_ms == why.lost_tokens * 0.5


def test_tools_in_another_order() -> None:
    t1 = [{"name": "search", "parameters": {}}, {"name": "fetch", "parameters": {}}]
    msgs = [{"role": "user", "content": "find the report for me now please"}]
    why, _ = run(msgs, msgs, tools=(t1, list(reversed(t1))))
    assert why.cause == "reordered" and why.where == "the tools"


def test_history_truncated_and_answer_rewritten() -> None:
    base = [{"role": "system", "content": SYS}, {"role": "user", "content": "first question here"}]
    old = base + [{"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"}]
    new = base + [
        {"role": "assistant", "content": "first answer, shortened by the app"},
        {"role": "user", "content": "third"},
    ]
    why, _ = run(old, new)
    assert why.cause == "history_rewritten" and why.where == "message 2 (assistant)"
    edited = base + [{"role": "assistant", "content": "ok!"}, {"role": "user", "content": "next"}]
    why, _ = run(base, edited, answer="ok then")
    assert why.cause == "answer_rewritten" and why.where == "the answer of request 1"


def test_no_break_evicted_first_and_unrelated() -> None:
    old = [{"role": "system", "content": SYS}, {"role": "user", "content": "one"}]
    new = old + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "two"}]
    a = render(new)
    prior = EarlierPrompt(1, tuple(render(old)), tuple(old), None, "ok")
    n = len(render(old))
    full = n - n % 16
    assert explain(a, new, None, full, 16, [prior], decode, 1.0).cause == "none"
    evicted = explain(a, new, None, 0, 16, [prior], decode, 1.0)
    assert evicted.cause == "evicted" and evicted.lost_tokens == full
    assert explain(a, new, None, 0, 16, [], decode, 1.0).cause == "first"
    other = EarlierPrompt(2, tuple(ord(c) for c in "zzz unrelated"), (), None, "")
    assert explain(a, new, None, 0, 16, [other], decode, 1.0).cause == "unrelated"


def test_a_clock_behind_evicted_blocks_is_a_timestamp_with_its_evicted_tokens_beside_it() -> None:
    """The clock breaks the prefix; the blocks before it were also evicted: both are reported."""
    old = [{"role": "system", "content": f"{SYS} It is 09:59 now."}, {"role": "user", "content": "hi"}]
    new = [{"role": "system", "content": f"{SYS} It is 10:03 now."}, {"role": "user", "content": "hi"}]
    kept, common = run(old, new)
    assert kept.cause == "timestamp" and kept.evicted_tokens == 0 and "evicted" not in kept.message
    expected = common - common % 16
    why, _ = run(old, new, cached=0)
    assert why.cause == "timestamp" and why.diverged_at == common and why.where == "the system prompt"
    assert (
        why.evicted_tokens == expected > 0 and f"the {expected} tokens before it were cached but evicted" in why.message
    )
    new_text = [{"role": "system", "content": f"{SYS} Then more text."}, {"role": "user", "content": "hi"}]
    plain, _ = run(old, new_text, cached=0)  # no recognisable content: the eviction is the cause
    assert plain.cause == "evicted" and plain.evicted_tokens > 0
