"""Copy drills for training the demo model (tools/train_demo_model.py).

Promises: each drill is a pure function of the `random.Random` it is given
and returns (token ids, per-token loss weight): weight 1 only where the
next token can be predicted by copying from earlier in the sequence, so the
loss trains the copy (induction) circuit that recall needs. Every drill
opens with `<|im_start|>`, like every chat.
"""

from __future__ import annotations

import random


def induction_tokens(rng: random.Random, tok, length: int, digits: bool = False) -> tuple[list[int], list[float]]:
    """A copy drill: a random run of ordinary tokens, repeated until `length`.

    With `digits` the run is digits only (ten symbols), so one token of
    context does not say where the copy stands: the model must match the
    last few tokens, as copying a phone extension among other numbers does.

    Only the repeats are predictable, and only by looking back for the
    earlier occurrence of the current token and copying what followed
    (an induction head), so the loss on them trains the copy circuit that
    recall needs. Weight 0 on the first run, 1 on the repeats.
    """
    lo = len(tok.all_special_ids)
    alphabet = [tok.convert_tokens_to_ids(d) for d in "0123456789"] if digits else list(range(lo, len(tok)))
    run = [rng.choice(alphabet) for _ in range(rng.randint(6, max(8, min(48, length // 2))))]
    # Starts like every chat, with <|im_start|>: a fixed first token gives
    # heads a place to park attention (a sink) when they have nothing to
    # copy. In probes, 64 drills of 64 tokens a step with this sink formed
    # the copy circuit in ~300 steps; 16 of 128 tokens without it had not
    # after 1,400 (docs/demo-model.md).
    ids: list[int] = [tok.convert_tokens_to_ids("<|im_start|>")]
    weight: list[float] = [0.0]
    first = True
    while len(ids) < length:
        ids += run
        weight += [0.0 if first else 1.0] * len(run)
        first = False
        if rng.random() < 0.5:  # a random gap so copies do not sit at fixed offsets
            gap = [rng.choice(alphabet) for _ in range(rng.randint(1, 16))]
            ids += gap
            weight += [0.0] * len(gap)
    return ids[:length], weight[:length]


def key_drill_tokens(rng: random.Random, tok, length: int) -> tuple[list[int], list[float]]:
    """A multi-token-key drill: records `name s1 s2 s3 value`, all with the same `s1 s2 s3`.

    The records are listed once, then asked again in random order: the
    value is graded, and only the name, four tokens back, says which value
    follows — the shape of "Zeno lives in the city of Lumo." among other
    people's cities, where a one-token copy picks a neighbour's value.
    """
    lo = len(tok.all_special_ids)
    pick = lambda: rng.randrange(lo, len(tok))  # noqa: E731
    shape = [pick() for _ in range(rng.randint(2, 4))]
    newline = tok.encode("\n", add_special_tokens=False)
    names = rng.sample([t for t in range(lo, len(tok)) if t not in shape and t not in newline], rng.randint(4, 12))
    records = [([name], [pick() for _ in range(rng.randint(1, 3))]) for name in names]
    ids: list[int] = [tok.convert_tokens_to_ids("<|im_start|>")]
    weight: list[float] = [0.0]
    for name, value in records:
        ids += name + shape + value + newline
        weight += [0.0] * (len(name) + len(shape) + len(value) + len(newline))
    while len(ids) < length:
        name, value = rng.choice(records)
        ids += name + shape + value + newline
        weight += [0.0] * (len(name) + len(shape)) + [1.0] * len(value) + [0.0] * len(newline)
    return ids[:length], weight[:length]
