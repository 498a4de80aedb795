"""Lay out a chat's notes to a token budget, with blocks at chosen depths.

Promises: `layout_notes` returns the notes text and the char span of every
placed block; the text is one block or filler line per line, so a block
always starts right after a newline (a token boundary for the demo
tokenizer and for any BPE that splits on whitespace). Token counts come from
the tokenizer passed in; nothing else about tokenization is assumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from kvscope.engine import chat
from kvscope.engine.tasks import text, vocab

NOTES_HEADER = "Notes:"


class ChatTokenizer(Protocol):
    """What the tasks need from a tokenizer (HF tokenizers and mlx-lm's wrapper fit)."""

    eos_token_id: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PlacedBlock:
    """A block's text and its char span in the notes."""

    text: str
    start: int
    end: int


def count_tokens(tokenizer: ChatTokenizer, line: str) -> int:
    """Tokens of `line` plus its separating newline."""
    return len(tokenizer.encode(line, add_special_tokens=False)) + 1


def layout_notes(
    rng: random.Random,
    tokenizer: ChatTokenizer,
    budget_tokens: int,
    anchored: list[tuple[str, float]],
    loose: list[str],
) -> tuple[str, list[PlacedBlock]]:
    """Fill `budget_tokens` with filler, `loose` blocks at random and `anchored` at depths.

    Args:
        anchored: (block, depth in 0..1) pairs placed at that fraction of the notes.
        loose: blocks (e.g. distractor facts) scattered at random positions.
    Returns:
        The notes text and one PlacedBlock per anchored block, in input order.
    """
    lines: list[tuple[str, int]] = [(b, count_tokens(tokenizer, b)) for b in loose]
    used = sum(n for _, n in lines) + sum(count_tokens(tokenizer, b) for b, _ in anchored)
    used += count_tokens(tokenizer, NOTES_HEADER)
    while used < budget_tokens:
        line = text.filler_line(rng)
        n = count_tokens(tokenizer, line)
        if used + n > budget_tokens and lines:
            break
        lines.append((line, n))
        used += n
    rng.shuffle(lines)
    total = max(1, sum(n for _, n in lines))
    # Insert deepest first so earlier indices stay valid.
    order = sorted(range(len(anchored)), key=lambda i: -anchored[i][1])
    cumulative = [0]
    for _, n in lines:
        cumulative.append(cumulative[-1] + n)
    slots: dict[int, int] = {}
    for i in order:
        target = anchored[i][1] * total
        slots[i] = min(range(len(cumulative)), key=lambda k: abs(cumulative[k] - target))
    out: list[str] = [NOTES_HEADER]
    placed: dict[int, tuple[int, int]] = {}
    pos = len(NOTES_HEADER) + 1
    for k in range(len(lines) + 1):
        for i in sorted((i for i in slots if slots[i] == k), key=lambda i: anchored[i][1]):
            block = anchored[i][0]
            placed[i] = (pos, pos + len(block))
            out.append(block)
            pos += len(block) + 1
        if k < len(lines):
            out.append(lines[k][0])
            pos += len(lines[k][0]) + 1
    notes = "\n".join(out)
    return notes, [PlacedBlock(anchored[i][0], *placed[i]) for i in range(len(anchored))]


def chat_messages(notes: str, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """System prompt, the notes turn and its acknowledgement, then `turns` (role, text)."""
    msgs = [
        {"role": "system", "content": vocab.SYSTEM_PROMPT},
        {"role": "user", "content": notes},
        {"role": "assistant", "content": vocab.NOTED},
    ]
    msgs.extend({"role": role, "content": content} for role, content in turns)
    return msgs


def overhead_tokens(tokenizer: ChatTokenizer, question: str) -> int:
    """Prompt tokens of a chat whose notes are empty: what the budget must leave room for."""
    msgs = chat_messages("", [("user", question)])
    return len(chat.encode(tokenizer, chat.render(tokenizer, msgs)))
