"""Compaction vs restart when the summary does NOT say the answer (Memento).

Memento's claim: after a block is summarised and masked, the KV of the
tokens computed while it was visible (the summary, the acknowledgement)
still carry information from it, so compaction keeps what a restart from
the summary text loses. Each episode here:

    system | notes: ...The code for locker 7 is 4821...  | Noted. | [summary] <other facts> | question
             '------------ masked after compaction -----'

The summary lists other facts from the notes and omits the target (mode
"omits"; mode "contains" puts the target in, the old sanity check). Three
conditions run the same question on the demo model's own caches:

- full cache: nothing masked;
- compact: the summary appended while the notes were visible, then the
  notes message masked (the Engine's `compact`);
- restart: system + summary + question, recomputed (the Engine's `restart`).

Two read-outs per condition:
- behaviour: exact answer (greedy reproduces it), answer log-prob, and the
  share of the number's digits the model predicts (teacher-forced, chance
  about 1 in 10);
- a linear probe (`probe.heldout_predictions`) on the cached K/V of turn
  n+1 -- the question and the answer's words up to the number ("The code
  for locker 7 is") -- per layer, decoding each digit of the number; restart
  is the control that must sit at chance, and so must layer 0 (its K/V are
  a function of the question's own tokens) and shuffled labels.

Knows nothing about printing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.tasks import answer_tokens, text
from kvscope.engine.tasks.notes import ChatTokenizer, chat_messages, layout_notes, overhead_tokens
from kvscope.lab.chat_runs import feed, feed_hidden, fresh_caches, render_chat, teacher_force, token_rows
from kvscope.lab.probe import heldout_predictions
from kvscope.lab.stats import Estimate, accuracy, bootstrap_mean, mcnemar

CONDITIONS = ("full cache", "compact (mask)", "restart")
SUMMARY_MODES = ("omits", "contains")
N_DIGITS = 4


@dataclass(frozen=True)
class LeakConfig:
    n: int = 100
    context: int = 384
    depth: float = 0.5
    seed: int = 0
    summary: str = "omits"  # or "contains"
    summary_facts: int = 3  # other facts the summary lists


@dataclass(frozen=True)
class LeakEpisode:
    index: int
    messages: list[dict[str, str]]  # system, notes, ack, summary, question
    answer: str
    value: str  # the 4-digit number


def make_leak_episode(i: int, config: LeakConfig, tok: ChatTokenizer) -> LeakEpisode:
    """A held-out code fact among distractors; the summary lists distractors only (or the fact too)."""
    rng = random.Random(f"leakage:{config.seed}:{i}")
    target = text.make_fact(rng, heldout=True, kind="code")
    distractors: list[text.Fact] = []
    for _ in range(min(24, 3 + config.context // 128)):
        distractors.append(text.make_fact(rng, None, frozenset({target.key} | {d.key for d in distractors})))
    summary_body = " ".join(d.statement for d in distractors[: config.summary_facts])
    if config.summary == "contains":
        summary_body = f"{summary_body} {target.statement}"
    summary = f"[summary] {summary_body}"
    budget = config.context - overhead_tokens(tok, target.question) - len(tok.encode(summary))
    notes, _ = layout_notes(rng, tok, budget, [(target.statement, config.depth)], [d.statement for d in distractors])
    messages = chat_messages(notes, [("user", summary), ("user", target.question)])
    return LeakEpisode(i, messages, target.statement, target.answer)


@dataclass
class LeakOutcome:
    """One episode under one condition."""

    exact: bool
    logprob: float
    digit_hits: np.ndarray  # (N_DIGITS,) bool: greedy predicts each digit of the number
    features: dict[str, list[np.ndarray]]  # 'kv' / 'hidden' -> per layer, pooled over turn n+1 up to the number


def _digit_positions(tok: object, answer: str, value: str) -> list[int]:
    enc = tok.encode  # type: ignore[attr-defined]
    at = answer.rindex(value)
    start, end = (
        len(enc(answer[:at], add_special_tokens=False)),
        len(enc(answer[: at + len(value)], add_special_tokens=False)),
    )
    if end - start != len(value):
        raise ValueError(f"the tokenizer does not split {value!r} into single digits; the digit read-out needs it")
    return list(range(start, end))


def _pooled(rows: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per layer: mean and last row of K and V over the given tokens, flattened."""
    out = []
    for k, v in rows:
        out.append(np.concatenate([k.mean(axis=1).ravel(), k[:, -1].ravel(), v.mean(axis=1).ravel(), v[:, -1].ravel()]))
    return out


def run_episode(lm: LoadedModel, ep: LeakEpisode) -> dict[str, LeakOutcome]:
    """The three conditions on one episode."""
    tok = lm.tokenizer
    chat = render_chat(tok, ep.messages)
    q_lo = chat.spans[4][0]
    notes_lo, notes_hi = chat.spans[1]
    answer = answer_tokens(tok, ep.answer)
    digits = _digit_positions(tok, ep.answer, ep.value)
    restart = render_chat(tok, [ep.messages[0], ep.messages[3], ep.messages[4]])
    r_lo = restart.spans[2][0]
    out: dict[str, LeakOutcome] = {}
    for name in CONDITIONS:
        caches = fresh_caches(lm)
        if name == "restart":
            context, question, lo = restart.tokens[:r_lo], restart.tokens[r_lo:], r_lo
        else:
            context, question, lo = chat.tokens[:q_lo], chat.tokens[q_lo:], q_lo
        feed(lm, caches, context)
        if name == "compact (mask)":
            for c in caches:
                c.set_visible(notes_lo, notes_hi, False)
        # Turn n+1 up to the number: the question and the answer's words before the first digit.
        turn = question + answer[: digits[0]]
        hidden = feed_hidden(lm, caches, turn)
        kv = _pooled(token_rows(caches, lo, lo + len(turn)))
        features = {"kv": kv, "hidden": [np.concatenate([h.mean(axis=0), h[-1]]) for h in hidden]}
        for c in caches:
            c.trim(len(turn))
        forced = teacher_force(lm, caches, question, answer)
        out[name] = LeakOutcome(forced.exact, forced.logprob, forced.greedy_hit[digits], features)
    return out


@dataclass(frozen=True)
class BehaviourRow:
    condition: str
    exact: Estimate
    digits: Estimate  # share of digits predicted (pooled over the number's digits)
    logprob: Estimate


@dataclass(frozen=True)
class ProbeRow:
    condition: str
    site: str  # "kv": the layer's cached K/V; "hidden": the residual stream after the layer
    layer: int
    accuracy: Estimate  # held-out digit accuracy, bootstrap over episodes
    shuffled: Estimate  # the same probe on labels shuffled across episodes


@dataclass
class LeakResult:
    config: LeakConfig
    model: str
    n_layers: int
    episodes: list[LeakEpisode]
    outcomes: list[dict[str, LeakOutcome]] = field(default_factory=list)
    _probe_cache: dict[tuple[tuple[int, ...], int, int], list[ProbeRow]] = field(default_factory=dict, repr=False)

    def behaviour(self) -> list[BehaviourRow]:
        rows = []
        for name in CONDITIONS:
            outs = [o[name] for o in self.outcomes]
            digits = [float(o.digit_hits.mean()) for o in outs]
            rows.append(
                BehaviourRow(
                    name,
                    accuracy([o.exact for o in outs]),
                    bootstrap_mean(digits, seed=self.config.seed),
                    bootstrap_mean([o.logprob for o in outs], seed=self.config.seed),
                )
            )
        return rows

    def paired(self) -> dict[str, str]:
        """Compact vs restart on the same episodes: McNemar on exact answers, bootstrap on log-prob gain."""
        c = [o["compact (mask)"] for o in self.outcomes]
        r = [o["restart"] for o in self.outcomes]
        gain = bootstrap_mean([a.logprob - b.logprob for a, b in zip(c, r)], seed=self.config.seed)
        digit_gain = bootstrap_mean(
            [float(a.digit_hits.mean() - b.digit_hits.mean()) for a, b in zip(c, r)], seed=self.config.seed
        )
        return {
            "exact, McNemar (compact-only vs restart-only)": mcnemar([a.exact for a in c], [b.exact for b in r]).fmt(),
            "answer log-prob, compact minus restart": gain.fmt(pct=False, digits=2),
            "digits predicted, compact minus restart": digit_gain.fmt(),
        }

    def probe(self, digits: tuple[int, ...] = (0,), folds: int = 5) -> list[ProbeRow]:
        """Held-out accuracy of a linear probe per condition, site and layer (chance = 1/10).

        Args:
            digits: which digits of the number to decode, pooled (0 = the
                first, the one the last probed position is about to say).
        """
        key = (digits, folds, len(self.outcomes))
        if key not in self._probe_cache:
            self._probe_cache[key] = self._probe(digits, folds)
        return self._probe_cache[key]

    def _probe(self, digits: tuple[int, ...], folds: int) -> list[ProbeRow]:
        values = np.array([[int(ep.value[j]) for j in digits] for ep in self.episodes])
        shuffled = values[np.random.default_rng(self.config.seed + 1).permutation(len(values))]
        rows = []
        for name in CONDITIONS:
            for site in ("kv", "hidden"):
                for layer in range(self.n_layers):
                    x = np.stack([o[name].features[site][layer] for o in self.outcomes])
                    hits, fake_hits = np.zeros(len(x)), np.zeros(len(x))
                    for j in range(values.shape[1]):
                        seed = self.config.seed + j
                        hits += heldout_predictions(x, values[:, j], 10, folds, seed) == values[:, j]
                        fake_hits += heldout_predictions(x, shuffled[:, j], 10, folds, seed) == shuffled[:, j]
                    n = values.shape[1]
                    acc = bootstrap_mean(hits / n, seed=self.config.seed)
                    rows.append(ProbeRow(name, site, layer, acc, bootstrap_mean(fake_hits / n, seed=self.config.seed)))
        return rows


def run_leakage(lm: LoadedModel, config: LeakConfig, progress: Callable[[str], None] = lambda s: None) -> LeakResult:
    """Every condition on `config.n` episodes."""
    if config.summary not in SUMMARY_MODES:
        raise ValueError(f"summary must be one of {SUMMARY_MODES}, got {config.summary!r}")
    episodes = [make_leak_episode(i, config, lm.tokenizer) for i in range(config.n)]
    result = LeakResult(config, lm.name, lm.n_layers, episodes)
    for i, ep in enumerate(episodes):
        result.outcomes.append(run_episode(lm, ep))
        progress(f"leakage episode {i + 1}/{len(episodes)}")
    return result
