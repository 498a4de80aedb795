"""Held-out evaluation episodes: recall a fact, or decide from a record's field.

Promises: `make_episodes(kind, n, context_tokens, depth, seed, tokenizer)` is
deterministic per arguments, draws from the `eval` seed stream (the training
stream is `train`) and only asks about held-out keys, so the demo model has
never been asked these questions. Each Episode knows where its fact sits (char
span in its message, token span in the prompt) so cache operations can target
the fact or everything around it. `with_erratum` appends a correction turn
(`[update] status -> open`) and flips the expected answer.

Chat layout of an episode (the question is its own turn, so the notes prefix
can be cached, edited or spliced before the question arrives):

    system | user: "Notes:\\n...fact..." | assistant: "Noted." | user: question
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from kvscope.engine import chat
from kvscope.engine.tasks import text, vocab
from kvscope.engine.tasks.notes import ChatTokenizer, chat_messages, layout_notes, overhead_tokens

EVAL_STREAM = "eval"
KINDS = ("recall", "decision")
NOTES_MESSAGE = 1


@dataclass(frozen=True)
class Episode:
    """One question over a long chat, with its expected answer and fact location.

    Attributes:
        messages: chat messages (role/content dicts) ending with the question.
        answer: exact expected reply: the restated fact ("The code for locker 7
            is 4821.") or field and verdict ("The status is blocked, so no.").
        fact: the line the answer depends on.
        fact_chars: (start, end) of `fact` in `messages[NOTES_MESSAGE]["content"]`.
        fact_tokens: (start, end) token span of `fact` in the prompt tokens.
        n_prompt_tokens: prompt length after the chat template.
        field/value: the decision field and its current value (decision only).
    """

    kind: str
    index: int
    seed: int
    depth: float
    messages: tuple[dict[str, str], ...]
    answer: str
    fact: str
    fact_chars: tuple[int, int]
    fact_tokens: tuple[int, int]
    n_prompt_tokens: int
    field: str | None = None
    value: str | None = None


def render_prompt(tokenizer: ChatTokenizer, messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """The prompt text: the tokenizer's chat template with the assistant turn opened."""
    return chat.render(tokenizer, list(messages))


def prompt_tokens(tokenizer: ChatTokenizer, episode: Episode) -> list[int]:
    """Token ids of the episode's prompt (chat template, generation prompt)."""
    return list(tokenizer.encode(render_prompt(tokenizer, episode.messages), add_special_tokens=False))


def _token_span(tokenizer: ChatTokenizer, rendered: str, notes: str, chars: tuple[int, int]) -> tuple[int, int]:
    base = rendered.index(notes)
    start = len(tokenizer.encode(rendered[: base + chars[0]], add_special_tokens=False))
    end = len(tokenizer.encode(rendered[: base + chars[1]], add_special_tokens=False))
    return start, end


def _n_distractors(context_tokens: int) -> int:
    return min(24, 3 + context_tokens // 128)


def _make_one(kind: str, index: int, seed: int, context_tokens: int, depth: float, tokenizer: ChatTokenizer) -> Episode:
    rng = random.Random(f"{EVAL_STREAM}:{kind}:{seed}:{index}")
    field: str | None = None
    value: str | None = None
    if kind == "recall":
        target = text.make_fact(rng, heldout=True)
        block, fact, question, answer = target.statement, target.statement, target.question, target.statement
        taken = frozenset({target.key})
    else:
        record = text.make_record(rng)
        field, value = rng.choice(record.decisive)
        block, fact = record.text, f"{field}: {value}"
        question = rng.choice(vocab.DECISION_QUESTIONS[field])
        answer = text.decision_reply(field, value)
        taken = frozenset()
    distractors: list[text.Fact] = []
    for _ in range(_n_distractors(context_tokens)):
        distractors.append(text.make_fact(rng, None, taken | {d.key for d in distractors}))
    budget = context_tokens - overhead_tokens(tokenizer, question)
    notes, placed = layout_notes(rng, tokenizer, budget, [(block, depth)], [d.statement for d in distractors])
    start = placed[0].start + block.index(fact)
    chars = (start, start + len(fact))
    messages = tuple(chat_messages(notes, [("user", question)]))
    rendered = render_prompt(tokenizer, messages)
    return Episode(
        kind=kind,
        index=index,
        seed=seed,
        depth=depth,
        messages=messages,
        answer=answer,
        fact=fact,
        fact_chars=chars,
        fact_tokens=_token_span(tokenizer, rendered, notes, chars),
        n_prompt_tokens=len(tokenizer.encode(rendered, add_special_tokens=False)),
        field=field,
        value=value,
    )


def make_episodes(
    kind: str, n: int, context_tokens: int, depth: float, seed: int, tokenizer: ChatTokenizer
) -> list[Episode]:
    """`n` held-out episodes of `kind` with prompts of about `context_tokens` tokens.

    Args:
        kind: "recall" (a fact among distractor facts and filler) or
            "decision" (a record whose field decides a yes/no question).
        depth: where the fact sits in the notes, 0 = first line, 1 = last.
        seed: episode stream seed; the same arguments give the same episodes.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown episode kind {kind!r}; expected one of {KINDS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return [_make_one(kind, i, seed, context_tokens, depth, tokenizer) for i in range(n)]


def erratum(episode: Episode, new_value: str | None = None) -> tuple[str, str]:
    """The correction text for a decision episode and the answer it implies.

    Returns:
        (`[update] status -> open`, new expected answer). Without `new_value`
        a value with the opposite decision is chosen (deterministically).
    """
    if episode.field is None or episode.value is None:
        raise ValueError("errata apply to decision episodes only")
    if new_value is None:
        rng = random.Random(f"erratum:{episode.seed}:{episode.index}")
        new_value = text.other_value(rng, episode.field, episode.value)
    if new_value not in vocab.DECISION_FIELDS[episode.field]:
        raise ValueError(f"{new_value!r} is not a value of field {episode.field!r}")
    return text.erratum_line(episode.field, new_value), text.decision_reply(episode.field, new_value)


def with_erratum(episode: Episode, tokenizer: ChatTokenizer, new_value: str | None = None) -> Episode:
    """The episode with an `[update]` turn before the question and the flipped answer."""
    line, answer = erratum(episode, new_value)
    new_value = line.rsplit("-> ", 1)[1]
    *head, question = episode.messages
    messages = (*head, {"role": "user", "content": line}, {"role": "assistant", "content": vocab.NOTED}, question)
    n_tokens = len(tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False))
    return replace(episode, messages=messages, answer=answer, value=new_value, n_prompt_tokens=n_tokens)
