"""KV patching: how much of a decision do a field's own K/V rows drive?

The editable-KV claim is causal: at prefill the model already wrote its
conclusion about a record's field onto the tokens after it, so the field's
own key/value rows drive little of the later decision, and overwriting them
alone leaves the model acting on the old value. Measured here as in
activation patching:

    clean run:           ... status: blocked ... Noted. | question -> "The status is [blocked]"
    counterfactual run:  ... status: open    ... Noted. | question -> "The status is [open]"

Both contexts have the same tokens except the value's (values are chosen
with the same token count, so every row sits at the same position). The
decision is the value the model states: the logit difference
LD = log p(B's value token) - log p(A's value token) after the teacher-forced
"The status is". Counterfactual rows are copied into the clean cache for
(a) the field's own tokens, (b) everything downstream of the field up to the
question, (c) both -- in one layer or all layers -- and the share of the
logit difference recovered is (LD_patched - LD_clean) / (LD_cf - LD_clean),
pooled over episodes as a ratio of sums with a bootstrap interval.
The same episodes also run the erratum (a correction turn appended before the
question) and the full recompute (= the counterfactual), so the table puts
erratum vs overwrite vs recompute on one footing.

Knows nothing about printing; returns per-episode numbers and summaries.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvscope.engine.model_loading import LoadedModel
from kvscope.engine.tasks import Episode, make_episodes
from kvscope.engine.tasks.text import decision_reply, erratum_line
from kvscope.engine.tasks.vocab import DECISION_FIELDS
from kvscope.lab.chat_runs import copy_caches, feed, fresh_caches, render_chat, teacher_force, write_rows
from kvscope.lab.stats import Estimate, accuracy, bootstrap_ratio, mcnemar

SITES = ("field", "downstream", "both")


@dataclass(frozen=True)
class PatchConfig:
    n: int = 100
    context: int = 512
    depth: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class Pair:
    """A decision episode with its counterfactual value and the token spans that matter."""

    episode: Episode
    new_value: str
    clean: list[int]  # context tokens (through the notes' acknowledgement)
    counterfactual: list[int]
    erratum: list[int]  # the correction turn's tokens, appended after the clean context
    question: list[int]  # question turn + generation prompt
    field_span: tuple[int, int]  # the value's tokens
    answer_prefix: list[int]  # "The status is" (teacher-forced)
    token_a: int  # first token of the old value's statement
    token_b: int  # ... of the new value's


@dataclass
class PatchOutcome:
    """One episode: logit differences (B minus A) under every condition."""

    ld: dict[str, float] = field(default_factory=dict)  # condition -> LD
    picks_b: dict[str, bool] = field(default_factory=dict)  # condition -> greedy states the new value


def counterfactual_value(ep: Episode, tok: object, rng_seed: str = "patch") -> str | None:
    """A value of the episode's field with the opposite verdict and the same token count, or None."""
    assert ep.field is not None and ep.value is not None
    enc = tok.encode  # type: ignore[attr-defined]
    n_tokens = len(enc(" " + ep.value, add_special_tokens=False))
    flip = not DECISION_FIELDS[ep.field][ep.value]
    options = sorted(
        v
        for v, ok in DECISION_FIELDS[ep.field].items()
        if ok == flip and len(enc(" " + v, add_special_tokens=False)) == n_tokens
    )
    if not options:
        return None
    return random.Random(f"{rng_seed}:{ep.seed}:{ep.index}").choice(options)


def _with_value(ep: Episode, value: str) -> list[dict[str, str]]:
    assert ep.value is not None
    notes = ep.messages[1]["content"]
    lo, hi = ep.fact_chars
    fixed = notes[:lo] + notes[lo:hi].replace(ep.value, value) + notes[hi:]
    return [dict(m) for m in (ep.messages[0], {"role": "user", "content": fixed}, *ep.messages[2:])]


def make_pair(ep: Episode, tok: object) -> Pair | None:
    """Tokens of the clean, counterfactual and erratum chats; None when no same-length value exists."""
    assert ep.field is not None and ep.value is not None
    new = counterfactual_value(ep, tok)
    if new is None:
        return None
    clean_msgs = [dict(m) for m in ep.messages]
    cf_msgs = _with_value(ep, new)
    clean, cf = render_chat(tok, clean_msgs), render_chat(tok, cf_msgs)
    ctx_end = clean.spans[2][1]
    if len(clean.tokens) != len(cf.tokens):
        return None
    diff = np.nonzero(np.array(clean.tokens) != np.array(cf.tokens))[0]
    if diff.size == 0 or diff[-1] >= ctx_end:
        return None
    with_err = render_chat(
        tok, [*clean_msgs[:3], {"role": "user", "content": erratum_line(ep.field, new)}, clean_msgs[3]]
    )
    enc = tok.encode  # type: ignore[attr-defined]
    prefix = enc(f"The {ep.field} is", add_special_tokens=False)
    a = enc(decision_reply(ep.field, ep.value), add_special_tokens=False)
    b = enc(decision_reply(ep.field, new), add_special_tokens=False)
    if a[: len(prefix)] != prefix or b[: len(prefix)] != prefix or a[len(prefix)] == b[len(prefix)]:
        return None
    err_lo, err_hi = with_err.spans[3]
    return Pair(
        episode=ep,
        new_value=new,
        clean=clean.tokens[:ctx_end],
        counterfactual=cf.tokens[:ctx_end],
        erratum=with_err.tokens[err_lo:err_hi],
        question=clean.tokens[ctx_end:],
        field_span=(int(diff[0]), int(diff[-1]) + 1),
        answer_prefix=prefix,
        token_a=a[len(prefix)],
        token_b=b[len(prefix)],
    )


def _decide(lm: LoadedModel, caches: list, pair: Pair, prompt: list[int]) -> tuple[float, bool]:  # type: ignore[type-arg]
    forced = teacher_force(lm, caches, prompt, [*pair.answer_prefix, pair.token_b])
    last = forced.rows[-1]
    return float(last[pair.token_b] - last[pair.token_a]), int(last.argmax()) == pair.token_b


def conditions(n_layers: int) -> list[str]:
    """Condition names, in table order."""
    names = ["clean (no correction)", "recompute (counterfactual)", "erratum"]
    for site in SITES:
        names.append(f"{site}, all layers")
        names += [f"{site}, layer {i}" for i in range(n_layers)]
    return names


def run_pair(lm: LoadedModel, pair: Pair) -> PatchOutcome:
    """Every condition on one episode."""
    out = PatchOutcome()
    clean = fresh_caches(lm)
    feed(lm, clean, pair.clean)
    cf = fresh_caches(lm)
    feed(lm, cf, pair.counterfactual)
    names = conditions(lm.n_layers)
    out.ld[names[0]], out.picks_b[names[0]] = _decide(lm, clean, pair, pair.question)
    out.ld[names[1]], out.picks_b[names[1]] = _decide(lm, cf, pair, pair.question)
    out.ld[names[2]], out.picks_b[names[2]] = _decide(lm, copy_caches(clean), pair, pair.erratum + pair.question)
    f_lo, f_hi = pair.field_span
    spans = {"field": [(f_lo, f_hi)], "downstream": [(f_hi, len(pair.clean))], "both": [(f_lo, len(pair.clean))]}
    for site in SITES:
        for layers, label in [(list(range(lm.n_layers)), "all layers")] + [
            ([i], f"layer {i}") for i in range(lm.n_layers)
        ]:
            patched = copy_caches(clean)
            for lo, hi in spans[site]:
                if hi > lo:
                    write_rows(patched, cf, lo, hi, layers)
            name = f"{site}, {label}"
            out.ld[name], out.picks_b[name] = _decide(lm, patched, pair, pair.question)
    return out


@dataclass(frozen=True)
class PatchRow:
    condition: str
    share: Estimate  # share of the clean -> counterfactual logit difference recovered
    picks_new: Estimate  # share of episodes whose greedy decision states the new value
    mean_ld: float


@dataclass
class PatchResult:
    config: PatchConfig
    model: str
    n_layers: int
    pairs: list[Pair]
    outcomes: list[PatchOutcome]
    skipped: int  # episodes without a same-length counterfactual value

    def rows(self) -> list[PatchRow]:
        clean = [o.ld["clean (no correction)"] for o in self.outcomes]
        cf = [o.ld["recompute (counterfactual)"] for o in self.outcomes]
        den = [c - a for a, c in zip(clean, cf)]
        out = []
        for name in conditions(self.n_layers):
            num = [o.ld[name] - a for o, a in zip(self.outcomes, clean)]
            lds = [o.ld[name] for o in self.outcomes]
            out.append(
                PatchRow(
                    name,
                    bootstrap_ratio(num, den, seed=self.config.seed),
                    accuracy([o.picks_b[name] for o in self.outcomes]),
                    float(np.mean(lds)) if lds else float("nan"),
                )
            )
        return out

    def paired(self, a: str, b: str) -> str:
        """McNemar on 'states the new value' between two conditions."""
        return mcnemar([o.picks_b[a] for o in self.outcomes], [o.picks_b[b] for o in self.outcomes]).fmt()


def run_patching(lm: LoadedModel, config: PatchConfig, progress: Callable[[str], None] = lambda s: None) -> PatchResult:
    """Build `config.n` usable pairs (drawing more episodes if some have no same-length value) and run them."""
    pairs: list[Pair] = []
    skipped, drawn = 0, 0
    while len(pairs) < config.n and drawn < 4 * config.n + 10:
        batch = make_episodes("decision", config.n + drawn, config.context, config.depth, config.seed, lm.tokenizer)
        for ep in batch[drawn:]:
            pair = make_pair(ep, lm.tokenizer)
            if pair is None:
                skipped += 1
            elif len(pairs) < config.n:
                pairs.append(pair)
        drawn = len(batch)
    outcomes = []
    for i, pair in enumerate(pairs):
        outcomes.append(run_pair(lm, pair))
        progress(f"kv-patching episode {i + 1}/{len(pairs)}")
    return PatchResult(config, lm.name, lm.n_layers, pairs, outcomes, skipped)
