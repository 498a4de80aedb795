"""Score episodes through a runner: exact-match accuracy and answer log-prob.

Promises: scoring knows nothing about caches or engines. It turns each
episode into prompt tokens (the tokenizer's chat template) and answer tokens
(answer + end-of-turn), hands both to a `Runner`, and grades what comes back:
a recall episode is correct when the greedy text up to the first end-of-turn
token, stripped, equals the expected reply exactly; a decision episode when
the reply's last word is the right verdict (yes/no) — the decision is what
the user acts on, while naming a different value of the same meaning
("paused" for "blocked") is not a wrong decision. Any cache trick (compression,
masking, splicing) plugs in as its own runner.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvscope.engine.tasks.episodes import Episode, prompt_tokens
from kvscope.engine.tasks.notes import ChatTokenizer
from kvscope.engine.tasks.text import decision_verdict

EXTRA_DECODE_TOKENS = 3


@dataclass(frozen=True)
class RunResult:
    """What a runner reports for one prompt.

    Attributes:
        generated_tokens: greedy continuation of the prompt (may end with eos).
        answer_logprob: teacher-forced sum of log-probs of the answer tokens.
    """

    generated_tokens: list[int]
    answer_logprob: float


class Runner(Protocol):
    """Greedy-decode up to len(answer_tokens) + a few tokens; score the answer."""

    def __call__(self, prompt_tokens: list[int], answer_tokens: list[int]) -> RunResult: ...


@dataclass(frozen=True)
class EpisodeScore:
    kind: str
    index: int
    n_prompt_tokens: int
    depth: float
    expected: str
    generated: str
    correct: bool
    answer_logprob: float


@dataclass(frozen=True)
class Scores:
    accuracy: float
    mean_answer_logprob: float
    n: int
    rows: tuple[EpisodeScore, ...]


def eos_ids(tokenizer: Any) -> set[int]:
    """End-of-turn ids: mlx-lm's wrapper knows several, HF tokenizers one."""
    many = getattr(tokenizer, "eos_token_ids", None) or ()
    ids = {int(many)} if isinstance(many, int) else {int(i) for i in many}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("tokenizer has no eos token; the answer cannot be terminated")
    return ids


def answer_tokens(tokenizer: ChatTokenizer, answer: str) -> list[int]:
    """The answer's tokens followed by the end-of-turn token."""
    eos = int(tokenizer.eos_token_id)
    return list(tokenizer.encode(answer, add_special_tokens=False)) + [eos]


def generated_text(tokenizer: Any, tokens: Sequence[int]) -> str:
    """Decoded text up to (not including) the first end-of-turn token."""
    stop = eos_ids(tokenizer)
    cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
    return str(tokenizer.decode(list(tokens[:cut]))).strip()


def is_correct(episode: Episode, reply: str) -> bool:
    """Recall: the exact reply. Decision: the reply's final yes/no verdict."""
    if episode.kind == "decision" and episode.field is not None and episode.value is not None:
        words = re.findall(r"[a-z]+", reply.lower())
        return bool(words) and words[-1] == decision_verdict(episode.field, episode.value)
    return reply == episode.answer


def score(episodes: Iterable[Episode], runner: Runner, tokenizer: ChatTokenizer) -> Scores:
    """Run every episode through `runner` and grade it."""
    rows: list[EpisodeScore] = []
    for ep in episodes:
        result = runner(prompt_tokens(tokenizer, ep), answer_tokens(tokenizer, ep.answer))
        text = generated_text(tokenizer, result.generated_tokens)
        rows.append(
            EpisodeScore(
                ep.kind,
                ep.index,
                ep.n_prompt_tokens,
                ep.depth,
                ep.answer,
                text,
                text == ep.answer,
                float(result.answer_logprob),
            )
        )
    n = len(rows)
    accuracy = sum(r.correct for r in rows) / n if n else math.nan
    mean_lp = sum(r.answer_logprob for r in rows) / n if n else math.nan
    return Scores(accuracy, mean_lp, n, tuple(rows))


@dataclass(frozen=True)
class Cell:
    """One row of a results table: scores at a context length and depth."""

    kind: str
    context_tokens: int
    depth: float
    scores: Scores


def format_table(cells: Sequence[Cell]) -> str:
    """A plain-text table: kind, context, depth, n, accuracy, mean answer log-prob."""
    header = f"{'kind':<9} {'context':>7} {'depth':>5} {'n':>4} {'accuracy':>8} {'answer logprob':>14}"
    lines = [header, "-" * len(header)]
    for c in cells:
        s = c.scores
        lines.append(
            f"{c.kind:<9} {c.context_tokens:>7} {c.depth:>5.2f} {s.n:>4} "
            f"{s.accuracy:>8.1%} {s.mean_answer_logprob:>14.3f}"
        )
    return "\n".join(lines)
