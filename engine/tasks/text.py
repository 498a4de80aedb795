"""Synthetic text pieces: filler sentences, recall facts and decision records.

Promises: every function is a pure function of the `random.Random` it is
given, so a seed fixes the text. Knows nothing about tokenizers or models.

A *fact* is one line stating a key -> value binding ("The code for locker 7
is 4821.") with the question that asks for it and the exact answer. The
assistant's reply restates the fact (`Fact.statement`), so recall is a copy
of the value after the restated key. A *record* is a block of `field: value` lines; its decision fields decide
yes/no questions ("status: blocked" -> "May I proceed?" -> "no").

Held-out keys: `is_heldout_key` splits the key space by a stable hash; the
training stream never *asks* about a held-out key and the evaluation stream
only asks about held-out keys, so scores measure recall, not memorisation.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from kvscope.engine.tasks import vocab

HELDOUT_MODULUS = 5


@dataclass(frozen=True)
class Fact:
    """One recallable key -> value statement; `answer` is the bare value."""

    kind: str
    key: str
    statement: str
    question: str
    answer: str


@dataclass(frozen=True)
class Record:
    """A block of `field: value` lines; `decisive` maps field -> value."""

    title: str
    lines: tuple[str, ...]
    decisive: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return "\n".join((self.title, *self.lines))


def is_heldout_key(key: str) -> bool:
    """True for keys reserved for evaluation questions (about 1 in 5)."""
    return zlib.crc32(key.encode("utf-8")) % HELDOUT_MODULUS == 0


def decision_verdict(field: str, value: str) -> str:
    """The yes/no a decision field's value implies."""
    return "yes" if vocab.DECISION_FIELDS[field][value] else "no"


def decision_reply(field: str, value: str) -> str:
    """The assistant's reply: the field it read, then the verdict.

    Naming the value before the verdict lets a small model copy it from the
    record (induction) and then decide from the words it just wrote.
    """
    return f"The {field} is {value}, so {decision_verdict(field, value)}."


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _fact_code(rng: random.Random) -> Fact:
    obj, n = rng.choice(vocab.CONTAINERS), rng.randint(1, 99)
    value = _digits(rng, 4)
    return Fact(
        "code", f"code|{obj} {n}", f"The code for {obj} {n} is {value}.", f"What is the code for {obj} {n}?", value
    )


def _fact_colour(rng: random.Random) -> Fact:
    name, colour = rng.choice(vocab.NAMES), rng.choice(vocab.COLOURS)
    return Fact(
        "colour",
        f"colour|{name}",
        f"{name}'s favourite colour is {colour}.",
        f"What is {name}'s favourite colour?",
        colour,
    )


def _fact_room(rng: random.Random) -> Fact:
    team, room = rng.choice(vocab.TEAMS), str(rng.randint(100, 999))
    return Fact(
        "room", f"room|{team}", f"Team {team} meets in room {room}.", f"Which room does team {team} meet in?", room
    )


def _fact_city(rng: random.Random) -> Fact:
    name, city = rng.choice(vocab.NAMES), rng.choice(vocab.CITIES)
    return Fact(
        "city", f"city|{name}", f"{name} lives in the city of {city}.", f"Which city does {name} live in?", city
    )


def _fact_pet(rng: random.Random) -> Fact:
    name, pet = rng.choice(vocab.NAMES), rng.choice(vocab.PETS)
    pet_name = rng.choice([n for n in vocab.NAMES if n != name])
    return Fact(
        "pet",
        f"pet|{name}|{pet}",
        f"{name} has a {pet} called {pet_name}.",
        f"What is the name of {name}'s {pet}?",
        pet_name,
    )


def _fact_phone(rng: random.Random) -> Fact:
    name, ext = rng.choice(vocab.NAMES), _digits(rng, rng.randint(3, 5))
    return Fact(
        "phone",
        f"phone|{name}",
        f"The phone extension of {name} is {ext}.",
        f"What is the phone extension of {name}?",
        ext,
    )


FACT_MAKERS = {
    "code": _fact_code,
    "colour": _fact_colour,
    "room": _fact_room,
    "city": _fact_city,
    "pet": _fact_pet,
    "phone": _fact_phone,
}


FACT_KINDS: tuple[str, ...] = tuple(FACT_MAKERS)


def make_fact(
    rng: random.Random,
    heldout: bool | None = None,
    taken: frozenset[str] = frozenset(),
    kind: str | None = None,
    max_tries: int | None = None,
) -> Fact:
    """A random fact whose key is not in `taken`.

    Args:
        heldout: True -> only held-out keys, False -> never held-out keys,
            None -> any key (distractors).
        kind: only facts of this kind (one of `FACT_KINDS`); None -> any kind.
        max_tries: give up (LookupError) after this many draws; a kind can
            run out of keys (there are 16 teams), and None then loops forever.
    """
    if kind is not None and kind not in FACT_MAKERS:
        raise ValueError(f"unknown fact kind {kind!r}; expected one of {FACT_KINDS}")
    makers = tuple(FACT_MAKERS.values()) if kind is None else (FACT_MAKERS[kind],)
    tries = 0
    while True:
        tries += 1
        if max_tries is not None and tries > max_tries:
            raise LookupError(f"no free {kind or 'fact'} key after {max_tries} draws")
        fact = rng.choice(makers)(rng)
        if fact.key in taken:
            continue
        if heldout is None or is_heldout_key(fact.key) == heldout:
            return fact


def make_record(rng: random.Random) -> Record:
    """A ticket-like record holding every decision field plus noise fields."""
    ticket = _digits(rng, 4)
    decisive = tuple((f, rng.choice(sorted(vals))) for f, vals in vocab.DECISION_FIELDS.items())
    noise = (
        ("owner", rng.choice(vocab.NAMES)),
        ("priority", rng.choice(vocab.PRIORITIES)),
        ("room", str(rng.randint(100, 999))),
    )
    fields = list(decisive) + [n for n in noise if rng.random() < 0.7]
    rng.shuffle(fields)
    lines = tuple(f"{name}: {value}" for name, value in fields)
    return Record(f"Record for ticket {ticket}:", lines, decisive)


def other_value(rng: random.Random, field: str, value: str) -> str:
    """A value of `field` whose decision differs from `value`'s."""
    flip = not vocab.DECISION_FIELDS[field][value]
    return rng.choice(sorted(v for v, ok in vocab.DECISION_FIELDS[field].items() if ok == flip))


def erratum_line(field: str, value: str) -> str:
    """The correction line the engine appends: `[update] status -> open`."""
    return f"[update] {field} -> {value}"


def filler_sentence(rng: random.Random) -> str:
    """One English-like sentence with no recallable content."""
    roll = rng.random()
    if roll < 0.6:
        s = (
            f"{rng.choice(vocab.SUBJECTS)} {rng.choice(vocab.VERBS)} "
            f"{rng.choice(vocab.OBJECTS)} {rng.choice(vocab.ADVERBIALS)}."
        )
    elif roll < 0.75:
        s = f"it was {rng.choice(vocab.ADJECTIVES)} and {rng.choice(vocab.ADJECTIVES)} {rng.choice(vocab.TIMES)}."
    elif roll < 0.9:
        s = f"{rng.choice(vocab.SUBJECTS)} waited for {rng.randint(2, 59)} minutes near {rng.choice(vocab.OBJECTS)}."
    else:
        s = f"nobody knew why {rng.choice(vocab.OBJECTS)} was so {rng.choice(vocab.ADJECTIVES)}."
    return s[0].upper() + s[1:]


def filler_line(rng: random.Random) -> str:
    """A line of one to three filler sentences."""
    return " ".join(filler_sentence(rng) for _ in range(rng.randint(1, 3)))
