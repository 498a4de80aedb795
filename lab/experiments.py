"""Head-to-head experiments on held-out episodes: compaction and errata.

- `mask_vs_restart`: the notes are summarised, then either the cache keeps
  going with the notes masked (compact = summarise, mask, continue) or a new
  session starts from system + summary (restart). Accuracy and TTFT of the
  question, next to the uncompacted full cache.
Every tally keeps its per-episode outcomes: Wilson intervals and paired
McNemar tests come from `Tally.accuracy_ci` and `Tally.versus`.

- `erratum_vs_overwrite`: a decision field changes. Either a correction turn
  is appended (erratum: only its tokens are prefilled), or the field's own
  rows are recomputed in place (overwrite: later rows stay stale), or the
  corrected chat is recomputed from scratch. Decision accuracy against the
  corrected answer and the tokens each strategy prefilled.

Knows nothing about printing; returns rows of numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kvscope.engine.generation import SamplingParams
from kvscope.engine.tasks import Episode, erratum
from kvscope.engine.tasks.scoring import is_correct
from kvscope.lab.stats import Estimate, McNemar, accuracy, mcnemar

if TYPE_CHECKING:
    from kvscope.engine.engine import Engine
    from kvscope.engine.events import SessionId

# Room for the longest expected reply ("The phone extension of Dmitri is 12345." is
# 14 tokens) plus its end-of-turn; shorter budgets cut answers and grade them wrong.
ANSWER = SamplingParams(max_tokens=24)


@dataclass
class Tally:
    """Accuracy, TTFT and prefill cost of one strategy over episodes."""

    name: str
    correct: int = 0
    n: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    prefilled: list[int] = field(default_factory=list)
    outcomes: list[bool] = field(default_factory=list)  # per episode, in episode order

    def add(self, ok: bool, ttft_ms: float, prefilled: int) -> None:
        self.correct += int(ok)
        self.n += 1
        self.outcomes.append(ok)
        self.ttft_ms.append(ttft_ms)
        self.prefilled.append(prefilled)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def accuracy_ci(self) -> Estimate:
        """Accuracy with its Wilson 95% interval."""
        return accuracy(self.outcomes)

    def versus(self, other: Tally) -> McNemar:
        """Exact McNemar test against a strategy graded on the same episodes."""
        return mcnemar(self.outcomes, other.outcomes)

    @property
    def median_ttft_ms(self) -> float:
        xs = sorted(self.ttft_ms)
        return xs[len(xs) // 2] if xs else float("nan")

    @property
    def mean_prefilled(self) -> float:
        return sum(self.prefilled) / len(self.prefilled) if self.prefilled else float("nan")


def _prefill_chat(eng: Engine, ep: Episode) -> tuple[SessionId, int, int]:
    """A session holding the episode up to its question. Returns (sid, notes_lo, notes_hi) tokens."""
    sid = eng.new_session(f"episode {ep.index}")
    sys_msg, notes, ack = ep.messages[0], ep.messages[1], ep.messages[2]
    eng.append_message(sid, sys_msg["role"], sys_msg["content"])
    lo = eng.session(sid).n_tokens
    eng.append_message(sid, notes["role"], notes["content"])
    hi = eng.session(sid).n_tokens
    eng.append_message(sid, ack["role"], ack["content"])
    return sid, lo, hi


def _ask(eng: Engine, sid: SessionId, question: str, graded: Episode, tally: Tally, extra_prefill: int = 0) -> None:
    res = eng.chat(sid, question, ANSWER)
    tally.add(is_correct(graded, res.text.strip()), res.stats.ttft_ms, res.stats.prefilled_tokens + extra_prefill)
    eng.close_session(sid)


def char_span_to_tokens(
    eng: Engine, sid: SessionId, lo: int, hi: int, content: str, c_lo: int, c_hi: int
) -> tuple[int, int]:
    """Token span within session tokens [lo, hi) covering chars [c_lo, c_hi) of `content`."""
    s = eng.session(sid)
    tok = eng.model.tokenizer
    base = tok.decode(s.tokens[lo:hi]).index(content)

    def first_token_reaching(n_chars: int) -> int:
        a, b = lo, hi
        while a < b:
            m = (a + b) // 2
            if len(tok.decode(s.tokens[lo : m + 1])) >= n_chars:
                b = m
            else:
                a = m + 1
        return a

    return first_token_reaching(base + c_lo + 1), first_token_reaching(base + c_hi) + 1


def mask_vs_restart(eng: Engine, episodes: list[Episode], generated_summary: bool = False) -> list[Tally]:
    """Full cache vs compact (summary + mask) vs restart (system + summary)."""
    full, compact, restart = Tally("full cache"), Tally("compact (mask)"), Tally("restart")
    for ep in episodes:
        question = ep.messages[-1]["content"]
        sid, _, _ = _prefill_chat(eng, ep)
        _ask(eng, sid, question, ep, full)

        sid, lo, hi = _prefill_chat(eng, ep)
        summary = eng.summarize(sid) if generated_summary else ep.fact
        t0 = time.perf_counter()
        rep = eng.compact(sid, lo, hi, summary=summary, fidelity=False)
        compact_ms = (time.perf_counter() - t0) * 1000
        _ask_timed(eng, sid, question, ep, compact, compact_ms, int(rep.extra["summary_tokens"]))

        sid, _, _ = _prefill_chat(eng, ep)
        t0 = time.perf_counter()
        new = eng.restart(sid, summary)
        restart_ms = (time.perf_counter() - t0) * 1000
        eng.close_session(sid)
        _ask_timed(eng, new, question, ep, restart, restart_ms, eng.session(new).n_tokens)
    return [full, compact, restart]


def _ask_timed(
    eng: Engine, sid: SessionId, q: str, graded: Episode, tally: Tally, before_ms: float, prefilled: int
) -> None:
    res = eng.chat(sid, q, ANSWER)
    tally.add(
        is_correct(graded, res.text.strip()), before_ms + res.stats.ttft_ms, prefilled + res.stats.prefilled_tokens
    )
    eng.close_session(sid)


def erratum_vs_overwrite(eng: Engine, episodes: list[Episode], new_values: list[str] | None = None) -> list[Tally]:
    """Decision accuracy after a field changes: erratum vs in-place overwrite vs full recompute.

    Args:
        new_values: the changed value per episode (default: `tasks.erratum`'s
            choice); `kv_patching` passes its same-length values so both
            experiments grade the same edits.
    """
    stale, err, over, full = Tally("no correction"), Tally("erratum"), Tally("overwrite span"), Tally("full recompute")
    for i, ep in enumerate(episodes):
        assert ep.field is not None and ep.value is not None
        correction, new_answer = erratum(ep, new_values[i] if new_values is not None else None)
        new_value = correction.rsplit("-> ", 1)[-1].strip()
        graded = replace(ep, value=new_value, answer=new_answer)  # the decision after the change
        question = ep.messages[-1]["content"]
        sid, _, _ = _prefill_chat(eng, ep)
        _ask(eng, sid, question, graded, stale)

        sid, _, _ = _prefill_chat(eng, ep)
        rep = eng.erratum(sid, correction, fidelity=False)
        _ask(eng, sid, question, graded, err, int(rep.extra["prefilled_tokens"]))

        sid, lo, hi = _prefill_chat(eng, ep)
        notes = ep.messages[1]["content"]
        v_lo = notes.index(ep.value, ep.fact_chars[0])
        t_lo, t_hi = char_span_to_tokens(eng, sid, lo, hi, notes, v_lo, v_lo + len(ep.value))
        old = eng.model.tokenizer.decode(eng.session(sid).tokens[t_lo:t_hi])
        rep = eng.replace_span(sid, t_lo, t_hi, old.replace(ep.value, new_value), fidelity=False)
        _ask(eng, sid, question, graded, over, int(rep.extra["new_tokens"]))

        fixed = notes[: ep.fact_chars[0]] + notes[ep.fact_chars[0] : ep.fact_chars[1]].replace(ep.value, new_value)
        fixed += notes[ep.fact_chars[1] :]
        corrected = Episode(
            **{**ep.__dict__, "messages": (ep.messages[0], {"role": "user", "content": fixed}, *ep.messages[2:])}
        )
        assert eng.store is not None
        eng.store.clear()
        sid, _, _ = _prefill_chat(eng, corrected)
        _ask(eng, sid, question, graded, full, eng.session(sid).n_tokens)
    return [stale, err, over, full]
