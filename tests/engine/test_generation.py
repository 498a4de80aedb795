"""Generation through the kvscope cache equals plain mlx-lm, turn reuse is exact."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from kvscope.engine import Engine, SamplingParams
from kvscope.engine.chat import common_prefix_len, first_turn_ids
from kvscope.engine.generation import forward
from kvscope.engine.kv_cache import ScopeKVCache

# float32 logits of the same sequence computed in different chunkings
# differ by summation order only.
ATOL = 1e-4


def _plain_greedy(lm, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok, _ in generate_step(mx.array(prompt), lm.model, max_tokens=n, prompt_cache=make_prompt_cache(lm.model)):
        out.append(int(tok))
    return out


def test_greedy_tokens_match_plain_mlx_lm(arch_dir: Path) -> None:
    eng = Engine()
    lm = eng.load(arch_dir)
    sid = eng.new_session(system="you are a code locker")
    msgs = [
        {"role": "system", "content": "you are a code locker"},
        {"role": "user", "content": "what is the code for locker 7 ?"},
    ]
    prompt = first_turn_ids(lm.tokenizer, msgs)
    res = eng.chat(sid, msgs[1]["content"], SamplingParams(max_tokens=24))
    expected = _plain_greedy(lm, prompt, 24)
    n = len(res.token_ids)
    assert n >= 1
    assert res.token_ids == expected[:n]


def test_prefix_hit_logits_match_full_recompute(arch_dir: Path) -> None:
    eng = Engine()
    lm = eng.load(arch_dir)
    system = "you are a code locker . " * 12  # several full blocks
    a = eng.new_session(system=system)
    eng.chat(a, "what is the code ?", SamplingParams(max_tokens=4))
    b = eng.new_session(system=system)
    res = eng.chat(b, "what is the colour of the water ?", SamplingParams(max_tokens=1))
    shared = common_prefix_len(eng.session(a).tokens, eng.session(b).tokens)
    assert shared >= 32
    assert res.stats.cached_tokens == shared - shared % 16
    assert res.stats.prefilled_tokens == res.stats.prompt_tokens - res.stats.cached_tokens
    assert eng.session(b).positions == list(range(eng.session(b).n_tokens))  # shared rows keep their positions
    # The hit session's next-token logits vs a fresh full prefill of the same ids.
    s = eng.session(b)
    ids = s.tokens[: res.stats.prompt_tokens]
    fresh = [ScopeKVCache() for _ in range(lm.n_layers)]
    want = forward(lm.model, ids, fresh)[0, -1]
    hit_caches = [c.copy() for c in s.caches]
    for c in hit_caches:
        c.trim(c.n_tokens - (len(ids) - 1))
    got = forward(lm.model, ids[-1:], hit_caches)[0, -1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=1e-4)


def test_second_turn_prefills_only_new_tokens(llama_dir: Path) -> None:
    eng = Engine()
    lm = eng.load(llama_dir)
    sid = eng.new_session(system="you are a code locker")
    r1 = eng.chat(sid, "what is the code for locker 7 ?", SamplingParams(max_tokens=6))
    n_after_first = eng.session(sid).n_tokens
    r2 = eng.chat(sid, "and the colour ?", SamplingParams(max_tokens=6))
    assert r1.stats.cached_tokens == 0
    assert r2.stats.cached_tokens == n_after_first
    # New tokens: the end of the answer turn + the new user turn + the generation prompt.
    added = lm.tokenizer.encode(
        "<|im_end|>\n<|im_start|>user\nand the colour ?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    if r1.finish_reason == "length":  # the unfed last answer token comes first
        added = [r1.token_ids[-1]] + added
    assert r2.stats.prefilled_tokens == len(added)
    assert eng.session(sid).tokens[n_after_first : n_after_first + len(added)] == added


def test_seeded_sampling_is_reproducible(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    a = eng.chat(eng.new_session(), "the code ?", p).token_ids
    b = eng.chat(eng.new_session(), "the code ?", p).token_ids
    c = eng.chat(eng.new_session(), "the code ?", SamplingParams(temperature=1.0, seed=8, max_tokens=12)).token_ids
    assert a == b
    assert a != c


def test_stop_string_ends_the_answer(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    free = eng.chat(eng.new_session(), "the code ?", SamplingParams(max_tokens=12))
    words = free.text.split()
    if len(words) < 3:
        pytest.skip("tiny model answered too briefly to pick a stop word")
    stop = words[2]
    res = eng.chat(eng.new_session(), "the code ?", SamplingParams(max_tokens=12, stop=(stop,)))
    assert res.finish_reason == "stop_string"
    assert stop not in res.text
    assert free.text.startswith(res.text)


@pytest.mark.parametrize("how", ["eos", "stop_string", "length"])
def test_cache_holds_exactly_the_fed_tokens_after_the_answer_stops(how: str) -> None:
    # decode() queues the pass that feeds each sampled token before reading it back;
    # when the token ends the answer that row must come off again, or the next turn
    # would attend to a token the session never recorded.
    from kvscope.engine.tasks import demo_model_path
    from kvscope.engine.tasks.vocab import SYSTEM_PROMPT

    eng = Engine()
    lm = eng.load(demo_model_path())
    sid = eng.new_session(system=SYSTEM_PROMPT)
    notes = "Notes:\nThe code for locker 7 is 4821.\nTeam Falcon meets in room 316."
    eng.chat(sid, notes, SamplingParams(max_tokens=2))
    params = {
        "eos": SamplingParams(max_tokens=64),
        "stop_string": SamplingParams(max_tokens=64, stop=("4821",)),
        "length": SamplingParams(max_tokens=4),
    }[how]
    res = eng.chat(sid, "What is the code for locker 7?", params)
    assert res.finish_reason == {"eos": "stop", "stop_string": "stop_string", "length": "length"}[how]
    s = eng.session(sid)
    for c in s.caches:
        assert c.n_rows == c.offset == s.n_tokens
        assert list(c.row_token[: c.n_rows]) == list(range(s.n_tokens))
    fresh = [ScopeKVCache() for _ in s.caches]
    mx.eval(lm.model(mx.array(s.tokens)[None], cache=fresh))
    for c, f in zip(s.caches, fresh, strict=True):
        assert np.allclose(np.array(c.state[0]), np.array(f.state[0]), atol=ATOL)
    # And the next turn answers from that cache as a recompute would.
    nxt = eng.chat(sid, "Which room does team Falcon meet in?", SamplingParams(max_tokens=24))
    assert nxt.text == "Team Falcon meets in room 316."
