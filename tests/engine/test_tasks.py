"""Episode generation and grading: deterministic, held out, located, gradeable."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
from transformers import AutoTokenizer

from kvscope.engine.tasks import (
    Cell,
    RunResult,
    answer_tokens,
    demo_model_path,
    erratum,
    format_table,
    make_episodes,
    prompt_tokens,
    score,
    with_erratum,
)
from kvscope.engine.tasks.corpus import ChatMix, training_chat
from kvscope.engine.tasks.scoring import is_correct


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(demo_model_path()))


def test_same_seed_same_episodes_other_seed_other_episodes(tok) -> None:
    a = make_episodes("recall", 5, 512, 0.5, seed=3, tokenizer=tok)
    b = make_episodes("recall", 5, 512, 0.5, seed=3, tokenizer=tok)
    c = make_episodes("recall", 5, 512, 0.5, seed=4, tokenizer=tok)
    assert a == b
    assert [e.messages for e in a] != [e.messages for e in c]


def test_recall_questions_never_appear_in_the_training_stream(tok) -> None:
    asked_in_training = {
        m["content"] for seed in range(400) for m in training_chat(seed, tok, 256).messages if m["role"] == "user"
    }
    held_out = {e.messages[-1]["content"] for e in make_episodes("recall", 150, 256, 0.5, 0, tok)}
    assert len(held_out) > 50
    assert not held_out & asked_in_training


def test_dense_mix_packs_more_facts_and_still_holds_keys_out(tok) -> None:
    dense = ChatMix(max_questions=12, repeat_facts=0.3, min_facts=6, facts_per_128=3)
    rng_a, rng_b = random.Random(0), random.Random(0)
    assert [ChatMix().n_facts(rng_a, 256) for _ in range(50)] == [rng_b.randint(2, 6) for _ in range(50)]
    assert min(dense.n_facts(rng_a, 128) for _ in range(50)) >= 6
    chats = [training_chat(seed, tok, 128, dense) for seed in range(200)]
    asked = {m["content"] for c in chats for m in c.messages if m["role"] == "user"}
    held_out = {e.messages[-1]["content"] for e in make_episodes("recall", 150, 256, 0.5, 0, tok)}
    assert not held_out & asked
    assert max(len(c.answer_indices) for c in chats) > 6


def test_same_kind_mix_adds_hard_distractors_and_leaves_the_default_stream_alone(tok) -> None:
    from kvscope.engine.tasks import text

    rng = random.Random(1)
    for kind in text.FACT_KINDS:
        facts = [text.make_fact(rng, None, frozenset(), kind) for _ in range(5)]
        assert {f.kind for f in facts} == {kind}
    with pytest.raises(ValueError):
        text.make_fact(rng, kind="shoe size")

    def most_of_one_kind(chat) -> int:
        notes = next(m["content"] for m in chat.messages if m["content"].startswith("Notes:"))
        shapes = (
            "lives in the city of",
            "favourite colour",
            "meets in room",
            "phone extension",
            " called ",
            "code for",
        )
        return max(len(re.findall(re.escape(s), notes)) for s in shapes)

    # A kind with few keys runs out instead of hanging: 16 teams, 16 taken.
    teams = frozenset(f"room|{t}" for t in text.vocab.TEAMS)
    with pytest.raises(LookupError, match="room"):
        text.make_fact(rng, None, teams, "room", max_tries=200)
    dense_long = ChatMix(max_questions=8, min_facts=90, facts_per_128=4, same_kind=1.0)
    for seed in range(40):  # would hang before max_tries when rooms run out
        training_chat(seed, tok, 2048, dense_long)
    hard = ChatMix(max_questions=8, min_facts=2, facts_per_128=1, same_kind=1.0)
    assert min(most_of_one_kind(training_chat(seed, tok, 512, hard)) for seed in range(30)) >= 4
    # same_kind=0 draws nothing extra: the stream the shipped v2 phases trained on is
    # unchanged (digest of the chats before same_kind existed).
    v2_mix = ChatMix(max_questions=8, repeat_facts=0.3, min_facts=4, facts_per_128=2)
    chats = json.dumps([training_chat(seed, tok, 512, v2_mix).messages for seed in range(20)])
    assert hashlib.sha256(chats.encode()).hexdigest()[:16] == "09f460b148d991d3"


def test_summary_turns_look_like_the_engines_and_are_asked_about(tok) -> None:
    mix = ChatMix(max_questions=8, min_facts=2, facts_per_128=1, summaries=1.0)
    restarts = 0
    for seed in range(30):
        msgs = training_chat(seed, tok, 256, mix).messages
        at = next(i for i, m in enumerate(msgs) if m["content"].startswith("[summary] "))
        summary, question, answer = msgs[at]["content"], msgs[at + 1], msgs[at + 2]
        # What compaction and restart write: a user turn, the next user turn right after it.
        assert msgs[at]["role"] == question["role"] == "user" and answer["role"] == "assistant"
        assert answer["content"] in summary  # the first question is about the summary
        restarts += not any(m["content"].startswith("Notes:") for m in msgs[:at])  # restart: no notes
    assert 5 < restarts < 25
    # summaries=0 draws nothing: same chats as a mix without the knob.
    plain = ChatMix(max_questions=8, repeat_facts=0.3, min_facts=4, facts_per_128=2)
    assert training_chat(7, tok, 512, plain) == training_chat(7, tok, 512, ChatMix(8, 0.3, 4, 2, 0.0, 0.0))


@pytest.mark.parametrize("kind", ["recall", "decision"])
@pytest.mark.parametrize("context", [512, 2048])
def test_prompt_length_and_fact_location(tok, kind: str, context: int) -> None:
    for ep in make_episodes(kind, 4, context, 0.5, 1, tok):
        tokens = prompt_tokens(tok, ep)
        assert len(tokens) == ep.n_prompt_tokens
        assert 0.9 * context <= len(tokens) <= context + 8
        notes = ep.messages[1]["content"]
        assert notes[ep.fact_chars[0] : ep.fact_chars[1]] == ep.fact
        start, end = ep.fact_tokens
        assert tok.decode(tokens[start:end]).strip() == ep.fact
        if kind == "recall":
            assert ep.answer == ep.fact
        else:
            assert re.fullmatch(rf"The {ep.field} is {ep.value}, so (yes|no)\.", ep.answer)


def test_depth_moves_the_fact_through_the_context(tok) -> None:
    def mean_position(depth: float) -> float:
        eps = make_episodes("recall", 6, 1024, depth, 2, tok)
        return sum(e.fact_tokens[0] / e.n_prompt_tokens for e in eps) / len(eps)

    early, middle, late = mean_position(0.1), mean_position(0.5), mean_position(0.9)
    assert early < 0.25 < middle < 0.75 < late


def test_erratum_flips_the_decision(tok) -> None:
    ep = make_episodes("decision", 1, 512, 0.3, 5, tok)[0]
    line, answer = erratum(ep)
    assert re.fullmatch(rf"\[update\] {ep.field} -> [a-z]+", line)
    assert answer != ep.answer
    fixed = with_erratum(ep, tok)
    assert fixed.answer == answer
    assert fixed.messages[-3]["content"] == line
    assert fixed.messages[-1] == ep.messages[-1]
    assert fixed.n_prompt_tokens > ep.n_prompt_tokens
    with pytest.raises(ValueError):
        erratum(make_episodes("recall", 1, 256, 0.5, 0, tok)[0])


def test_bad_arguments_are_rejected(tok) -> None:
    with pytest.raises(ValueError):
        make_episodes("summarise", 1, 512, 0.5, 0, tok)
    with pytest.raises(ValueError):
        make_episodes("recall", 1, 512, 1.5, 0, tok)


def test_grading_rewards_the_answer_and_only_the_answer(tok) -> None:
    eps = make_episodes("recall", 4, 256, 0.5, 0, tok)

    def oracle(prompt: list[int], answer: list[int]) -> RunResult:
        return RunResult(list(answer), -0.5)

    def off_by_one(prompt: list[int], answer: list[int]) -> RunResult:
        return RunResult(tok.encode("1" + tok.decode(answer[:-1])) + answer[-1:], -9.0)

    good, bad = score(eps, oracle, tok), score(eps, off_by_one, tok)
    assert (good.accuracy, good.n, good.mean_answer_logprob) == (1.0, 4, -0.5)
    assert bad.accuracy == 0.0
    assert answer_tokens(tok, "4821")[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    decision = make_episodes("decision", 1, 256, 0.5, 0, tok)[0]
    verdict = decision.answer.rstrip(".").rsplit(" ", 1)[1]
    flipped = "no" if verdict == "yes" else "yes"
    assert is_correct(decision, decision.answer)
    assert is_correct(decision, f"The {decision.field} is whatever, so {verdict}.")
    assert not is_correct(decision, decision.answer.replace(f"so {verdict}", f"so {flipped}"))
    assert not is_correct(decision, "")
    table = format_table([Cell("recall", 256, 0.5, good), Cell("recall", 256, 0.5, bad)])
    assert "100.0%" in table and "0.0%" in table and "-9.000" in table
