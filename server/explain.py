"""Why did this request miss the cache? The prefix-break explainer.

For one request it names the longest cached prefix, the closest earlier
request (longest common token prefix), the first token where the two
diverge, the text on both sides, and a cause when one is recognisable:

    ours:    <|im_start|>system\\nIt is 12:0|1 ...      <- diverged at token 17
    theirs:  <|im_start|>system\\nIt is 12:0|0 ...
             cause: timestamp, in the system prompt; 480 tokens recomputed (~95 ms)

Causes, checked in this order: nothing earlier (`first`), nothing in
common with any earlier request (`unrelated`), no break (`none`); then the
content at the divergence: `timestamp`, `date`, `counter`, `random_id`,
`whitespace`, `reordered` (tools or JSON keys in another order); then
blocks before it that were cached but got evicted (`evicted`); then where
it is: `system_prompt` (edited), `answer_rewritten` (the client's copy of an
earlier answer differs from what was generated), `history_rewritten` (an
earlier message edited, dropped or truncated), else `different_prompt`.
Evicted blocks are counted apart (`evicted_tokens`) whatever the cause: a
clock in the system prompt whose preceding blocks were also evicted is a
`timestamp` with its evicted tokens beside it.

Pure Python over token ids, messages and a `decode` function: knows
nothing about mx, the prefix store or HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

_WORD_TAIL = re.compile(r"[\w:.\-/+]*$")
_WORD_HEAD = re.compile(r"^[\w:.\-/+]*")
_TIME = re.compile(r"\d{1,2}:\d{2}")
_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4}|\b(Mon|Tue|Wed|Thu|Fri|Sat|Sun|Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[\d.,]+$")
_ID = re.compile(r"^[0-9A-Za-z_\-]{6,}$")
_HEX = re.compile(r"^[0-9a-fA-F\-]{6,}$")

LABELS = {
    "first": "the first request: nothing was cached yet",
    "none": "no break: the prompt extends an earlier one",
    "evicted": "the shared prefix was cached but its blocks were evicted",
    "timestamp": "a time that changed",
    "date": "a date that changed",
    "counter": "a number or counter that changed",
    "random_id": "a random id that changed",
    "whitespace": "whitespace only",
    "reordered": "tools or JSON keys in a different order",
    "system_prompt": "an edited system prompt",
    "answer_rewritten": "an earlier answer the client changed before sending it back",
    "history_rewritten": "a history the client truncated or rewrote",
    "different_prompt": "the prompts differ from here (new content)",
    "unrelated": "no earlier request shares a prefix with it",
}


@dataclass(frozen=True)
class EarlierPrompt:
    """What the explainer keeps of a finished request."""

    request_id: int
    token_ids: tuple[int, ...]  # prompt + the answer tokens fed into its session
    messages: tuple[dict[str, str], ...]
    tools: tuple[dict[str, Any], ...] | None
    answer: str
    array: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", np.asarray(self.token_ids, dtype=np.int64))


@dataclass(frozen=True)
class PrefixBreak:
    cause: str
    message: str
    cached_tokens: int
    closest_request: int | None
    common_tokens: int  # longest common token prefix with the closest request
    diverged_at: int | None  # first differing token index (None: no divergence)
    where: str  # "the system prompt", "message 3 (user)", "the tools", "the answer of request 2", ""
    before_text: str
    ours_text: str
    theirs_text: str
    lost_tokens: int  # tokens recomputed because of the break
    lost_ms: float  # at the request's measured prefill speed
    evicted_tokens: int = 0  # of the prefix shared with the closest request: cached once, evicted since

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def common_prefix_len(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix (vectorized: agents resend thousands of tokens)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def closest(prompt: Sequence[int], earlier: Sequence[EarlierPrompt]) -> tuple[EarlierPrompt | None, int]:
    """The earlier prompt sharing the longest token prefix (the most recent on ties)."""
    best, best_n = None, -1
    ids = np.asarray(prompt, dtype=np.int64)
    for e in reversed(earlier):
        n = common_prefix_len(ids, e.array)
        if n > best_n:
            best, best_n = e, n
    return best, max(best_n, 0)


def explain(
    prompt: Sequence[int],
    messages: Sequence[dict[str, str]],
    tools: Sequence[dict[str, Any]] | None,
    cached_tokens: int,
    block_size: int,
    earlier: Sequence[EarlierPrompt],
    decode: Callable[[Sequence[int]], str],
    ms_per_token: float,
) -> PrefixBreak:
    """Explain where and why `prompt` stopped matching the cache."""
    prior, d = closest(prompt, earlier)
    if prior is not None and d == 0:
        return _result("unrelated", cached_tokens, None, 0, None, "", ("", "", ""), 0, ms_per_token)
    if prior is None:
        return _result("first", cached_tokens, None, 0, None, "", ("", "", ""), 0, ms_per_token)
    theirs = prior.token_ids
    reusable = min(len(theirs), len(prompt) - 1)  # the last prompt token is always fed
    could = reusable - reusable % block_size
    expected = min(d, len(prompt) - 1)
    expected -= expected % block_size
    evicted = max(0, expected - cached_tokens)
    if d >= len(theirs) or d >= len(prompt):
        cause = "evicted" if evicted else "none"
        return _result(cause, cached_tokens, prior, d, None, "", ("", "", ""), evicted, ms_per_token, evicted)
    texts = (decode(prompt[max(0, d - 16) : d]), decode(prompt[d : d + 16]), decode(theirs[d : d + 16]))
    lost = max(0, could - cached_tokens)
    where, cause = _locate(messages, tools, prior)
    content = _content_cause(texts, decode(prompt[d : d + 64]), decode(theirs[d : d + 64]), tools, prior)
    cause = content or ("evicted" if evicted else cause)
    return _result(cause, cached_tokens, prior, d, d, where, texts, lost, ms_per_token, evicted)


def _locate(
    messages: Sequence[dict[str, str]], tools: Sequence[dict[str, Any]] | None, prior: EarlierPrompt
) -> tuple[str, str]:
    """(where the chats first differ, the cause that place suggests)."""
    if not messages:  # a raw completion prompt: no structure to point at
        return "", "different_prompt"
    if _canon(tools, sort=False) != _canon(prior.tools, sort=False):
        return "the tools", "different_prompt"
    theirs = list(prior.messages)
    for i, m in enumerate(messages):
        label = f"message {i} ({m['role']})"
        if i == len(theirs):  # ours goes on past their prompt: this should be their answer
            if m["role"] == "assistant" and m["content"] != prior.answer:
                return f"the answer of request {prior.request_id}", "answer_rewritten"
            return label, "different_prompt"
        if m != theirs[i]:
            if m["role"] == "system" and theirs[i]["role"] == "system":
                return "the system prompt", "system_prompt"
            if i + 1 < len(messages) or i + 1 < len(theirs):
                return label, "history_rewritten"
            return label, "different_prompt"
    return ("", "history_rewritten") if len(messages) < len(theirs) else ("", "different_prompt")


def _content_cause(
    texts: tuple[str, str, str],
    ours_long: str,
    theirs_long: str,
    tools: Sequence[dict[str, Any]] | None,
    prior: EarlierPrompt,
) -> str | None:
    before, ours, theirs = texts
    if tools and prior.tools and _canon(tools, sort=True) == _canon(prior.tools, sort=True):
        return "reordered"
    sa, sb = _squash(ours_long), _squash(theirs_long)
    m = min(len(sa), len(sb), 48)
    if sa[:m] == sb[:m]:  # the same text once whitespace is ignored
        return "whitespace"
    tail = _WORD_TAIL.search(before)
    head = tail.group(0) if tail else ""
    wa = (head + _first_word(ours)).rstrip(".,:;/-+")
    wb = (head + _first_word(theirs)).rstrip(".,:;/-+")
    context_a, context_b = before[-24:] + ours, before[-24:] + theirs
    if _TIME.search(wa) and _TIME.search(wb):
        return "timestamp"
    if (_DATE.search(wa) and _DATE.search(wb)) or (_DATE.search(context_a) and _DATE.search(context_b) and _digits(wa)):
        return "date"
    if _NUMBER.match(wa) and _NUMBER.match(wb) and _digits(wa):
        return "counter"
    if _is_id(wa) and _is_id(wb):
        return "random_id"
    if _json_equal(ours_long, theirs_long, before):
        return "reordered"
    return None


def _first_word(s: str) -> str:
    m = _WORD_HEAD.match(s)
    return m.group(0) if m else ""


def _digits(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _is_id(w: str) -> bool:
    if not _ID.match(w):
        return False
    return bool(_HEX.match(w) and _digits(w)) or (_digits(w) and any(c.isalpha() for c in w))


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _json_equal(ours: str, theirs: str, before: str) -> bool:
    """The divergence sits in a JSON object whose keys only moved."""
    start = before.rfind("{")
    if start < 0:
        return False
    a, b = before[start:] + ours, before[start:] + theirs
    for end_a in range(len(a), 0, -1):
        if a[end_a - 1] != "}":
            continue
        for end_b in range(len(b), 0, -1):
            if b[end_b - 1] != "}":
                continue
            try:
                ja, jb = json.loads(a[:end_a]), json.loads(b[:end_b])
            except ValueError:
                continue
            return bool(ja == jb and a[:end_a] != b[:end_b])
    return False


def _canon(tools: Sequence[dict[str, Any]] | None, sort: bool) -> str:
    if not tools:
        return ""
    items = [json.dumps(t, sort_keys=True) for t in tools]
    return json.dumps(sorted(items) if sort else items)


def _result(
    cause: str,
    cached: int,
    prior: EarlierPrompt | None,
    common: int,
    diverged: int | None,
    where: str,
    texts: tuple[str, str, str],
    lost: int,
    ms_per_token: float,
    evicted: int = 0,
) -> PrefixBreak:
    rid = prior.request_id if prior else None
    lost_ms = lost * ms_per_token
    msg = LABELS[cause]
    if diverged is not None:
        msg = f"prefix broke at token {diverged}{' in ' + where if where else ''}: {msg}"
        msg += f" ({texts[1][:24]!r} here, {texts[2][:24]!r} in request {rid})"
    elif rid is not None:
        msg += f" (request {rid}, {common} tokens in common)"
    if evicted and cause != "evicted":
        msg += f"; the {evicted} tokens before it were cached but evicted"
    if lost:
        msg += f"; {lost} tokens recomputed, ~{lost_ms:.0f} ms"
    return PrefixBreak(cause, msg, cached, rid, common, diverged, where, *texts, lost, lost_ms, evicted)
