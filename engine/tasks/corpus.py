"""The training stream for the demo model: multi-question chats over notes.

Promises: `training_chat(seed, ...)` is a pure function of its arguments and
never asks about a held-out key (`text.is_heldout_key`), so evaluation
episodes from `episodes.make_episodes` stay held out. `tokenizer_corpus`
yields raw text (no tokenizer needed) to train the BPE vocabulary on.

A training chat is: system, optional small talk, the notes (filler, facts,
maybe a record and `[update]` lines), "Noted.", then 1..`max_questions`
questions, maybe an `[update]` turn between them. Answers are the replies
the evaluation expects: the restated fact ("The code for locker 7 is
4821.") or the field then the verdict ("The status is blocked, so no.").
The copy drills the trainer mixes in live in tools/train_demo_model.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kvscope.engine.tasks import text, vocab
from kvscope.engine.tasks.notes import ChatTokenizer, chat_messages, layout_notes

TRAIN_STREAM = "train"


@dataclass(frozen=True)
class ChatMix:
    """Knobs of the training stream; the defaults are v1's first phase (the
    shipped v4's phases set every knob from the trainer's flags, docs/demo-model.md).

    Attributes:
        max_questions: questions per chat are drawn from 1..max_questions.
        repeat_facts: chance that a fact is stated twice in the notes; the
            second copy gives the context loss a dense copy (induction) signal.
        min_facts, facts_per_128: fact density of the notes; raising them
            packs more key -> value lookups into a short chat (the lookup
            curriculum of the second training run).
        same_kind: chance that a chat adds 4-10 facts of one kind (hard
            distractors: "X lives in the city of Y" x 8 differ only in X and
            Y, so the lookup must match the whole key, not the sentence shape).
        summaries: chance that a chat carries a `[summary] ...` user turn, the
            message the engine's compaction and restart write: half of them
            follow the notes (compaction: more facts to look up there), half
            replace the whole chat (restart: system, summary, questions).
    """

    max_questions: int = 6
    repeat_facts: float = 0.0
    min_facts: int = 2
    facts_per_128: int = 1
    same_kind: float = 0.0
    summaries: float = 0.0

    def n_facts(self, rng: random.Random, context_tokens: int) -> int:
        """Facts in a chat: `min_facts`..`4 + facts_per_128` per 128 tokens of notes."""
        return rng.randint(self.min_facts, max(self.min_facts, 4 + context_tokens * self.facts_per_128 // 128))


@dataclass(frozen=True)
class TrainingChat:
    """Messages plus the indices of assistant messages that are graded answers."""

    messages: list[dict[str, str]]
    answer_indices: tuple[int, ...]


def _questions(
    rng: random.Random, facts: list[text.Fact], record: text.Record | None, updates: dict[str, str], most: int
) -> list[tuple[str, str]]:
    pool: list[tuple[str, str]] = [(f.question, f.statement) for f in facts if not text.is_heldout_key(f.key)]
    if record is not None:
        values = dict(record.decisive) | updates
        for field, value in values.items():
            pool.append((rng.choice(vocab.DECISION_QUESTIONS[field]), text.decision_reply(field, value)))
    rng.shuffle(pool)
    unique = list(dict.fromkeys(pool))
    return unique[: rng.randint(1, most)]


def training_chat(seed: int, tokenizer: ChatTokenizer, context_tokens: int, mix: ChatMix = ChatMix()) -> TrainingChat:
    """One training chat whose notes take about `context_tokens` tokens."""
    rng = random.Random(f"{TRAIN_STREAM}:{seed}")
    n_facts = mix.n_facts(rng, context_tokens)
    facts: list[text.Fact] = []
    for _ in range(n_facts):
        facts.append(text.make_fact(rng, None, frozenset(f.key for f in facts)))
    if mix.same_kind > 0 and rng.random() < mix.same_kind:  # guarded: the default stream draws nothing here
        kind = rng.choice(text.FACT_KINDS)
        for _ in range(rng.randint(4, 10)):
            try:  # a long chat can already hold every key of a small kind (16 teams)
                facts.append(text.make_fact(rng, None, frozenset(f.key for f in facts), kind, max_tries=500))
            except LookupError:
                break
    record = text.make_record(rng) if rng.random() < 0.6 else None
    anchored: list[tuple[str, float]] = []
    inline: dict[str, str] = {}
    if record is not None:
        depth = rng.random() * 0.9
        anchored.append((record.text, depth))
        if rng.random() < 0.3:
            field, value = rng.choice(record.decisive)
            inline[field] = text.other_value(rng, field, value) if rng.random() < 0.8 else value
            anchored.append((text.erratum_line(field, inline[field]), depth + rng.random() * (1 - depth)))
    loose = [f.statement for f in facts]
    if mix.repeat_facts > 0:
        loose += [f.statement for f in facts if rng.random() < mix.repeat_facts]
    notes, _ = layout_notes(rng, tokenizer, context_tokens, anchored, loose)
    turns: list[tuple[str, str]] = []
    questions = _questions(rng, facts, record, inline, mix.max_questions)
    late: dict[str, str] = {}
    if record is not None and rng.random() < 0.25:
        field, value = rng.choice(record.decisive)
        late[field] = text.other_value(rng, field, (dict(record.decisive) | inline)[field])
        turns += [("user", text.erratum_line(field, late[field])), ("assistant", vocab.NOTED)]
        questions = _questions(rng, facts, record, inline | late, mix.max_questions)
    for q, a in questions:
        turns += [("user", q), ("assistant", a)]
    messages = chat_messages(notes, turns)
    if mix.summaries > 0 and rng.random() < mix.summaries:  # guarded: the default stream draws nothing here
        messages = _with_summary(rng, messages, facts, mix.max_questions)
    if rng.random() < 0.1:
        hello, reply = rng.choice(vocab.GREETINGS)
        messages[1:1] = [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
    answers = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"] != vocab.NOTED)
    return TrainingChat(messages, answers)


def _with_summary(
    rng: random.Random, messages: list[dict[str, str]], facts: list[text.Fact], most: int
) -> list[dict[str, str]]:
    """`messages` with a `[summary] ...` user turn of 1-3 new facts, then questions.

    Compaction appends the summary after the chat (the notes stay, masked or
    not); restart starts over from the system prompt and the summary alone.
    Either way the next user turn follows the summary directly, with no reply
    between them, as the engine writes it.
    """
    taken = frozenset(f.key for f in facts)
    summed: list[text.Fact] = []
    for _ in range(rng.randint(1, 3)):
        summed.append(text.make_fact(rng, False, taken | {f.key for f in summed}, max_tries=500))
    summary = {"role": "user", "content": "[summary] " + " ".join(f.statement for f in summed)}
    restart = rng.random() < 0.5
    head = [messages[0], summary] if restart else [*messages[:3], summary]
    pool = [(f.question, f.statement) for f in summed]
    if not restart:
        pool += [(f.question, f.statement) for f in facts if not text.is_heldout_key(f.key)]
    rng.shuffle(pool)
    first = (summed[0].question, summed[0].statement)  # the summary is always asked about
    asked = [first] + [qa for qa in pool[: rng.randint(0, most - 1)] if qa != first]
    for q, a in asked:
        head += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return head


def tokenizer_corpus(n_chats: int, seed: int = 0) -> Iterator[str]:
    """Raw chat-like text covering every word the generators use."""
    rng = random.Random(f"tokenizer:{seed}")
    for _ in range(n_chats):
        facts = [text.make_fact(rng) for _ in range(6)]
        record = text.make_record(rng)
        lines = [text.filler_line(rng) for _ in range(8)] + [f.statement for f in facts]
        lines += [record.text, text.erratum_line("status", "open")]
        lines += [f.question + " " + f.answer for f in facts]
        lines += [q for qs in vocab.DECISION_QUESTIONS.values() for q in qs] + ["yes", "no"]
        lines += [g for pair in vocab.GREETINGS for g in pair] + [vocab.SYSTEM_PROMPT, vocab.NOTED]
        rng.shuffle(lines)
        yield "\n".join(lines)
