"""The bundled demo model: loads with mlx-lm, chats in ChatML, remembers facts."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from kvscope.app import cmd_eval
from kvscope.engine.tasks import demo_model_path, make_episodes, score
from kvscope.engine.tasks.mlx_runner import MlxRunner
from kvscope.engine.tasks.scoring import eos_ids
from kvscope.engine.tasks.vocab import SYSTEM_PROMPT

# mlx is imported inside the tests, after kvscope.engine pointed it at a fast BLAS.

MODEL_DIR = demo_model_path()


@pytest.fixture(scope="module")
def loaded():
    import mlx_lm

    return mlx_lm.load(str(MODEL_DIR))[:2]


def test_folder_is_small_llama_with_gqa_and_documented() -> None:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_attention_heads"] > config["num_key_value_heads"] > 0
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert total <= 25_000_000
    readme = (MODEL_DIR / "README.md").read_text()
    assert "tools/train_demo_model.py" in readme and "licen" in readme.lower()


def test_tokenizer_speaks_chatml_and_splits_digits(loaded) -> None:
    _, tok = loaded
    own = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    # Without a system message the template supplies the one the model was trained with.
    default = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    assert default == own.replace("Be brief.", SYSTEM_PROMPT)
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids
    digits = tok.encode("4821", add_special_tokens=False)
    assert [tok.decode([t]) for t in digits] == ["4", "8", "2", "1"]
    assert len(tok.encode(" favourite colour", add_special_tokens=False)) == 2


def test_greeting_gets_an_english_reply_that_ends_its_turn(loaded) -> None:
    import mlx_lm

    model, tok = loaded
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True)
    reply = mlx_lm.generate(model, tok, prompt, max_tokens=40)
    assert re.fullmatch(r"[A-Z][A-Za-z' ,.!?-]{8,}", reply.strip()), reply
    assert len(reply.split()) >= 3


def test_notes_get_noted_and_the_turn_ends(loaded) -> None:
    # The headless demo of ./run.sh: a two-line note, then a question about it.
    import mlx_lm

    model, tok = loaded
    notes = {"role": "user", "content": "Notes:\nThe code for locker 7 is 4821.\nTeam Falcon meets in room 212."}
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, notes]
    noted = mlx_lm.generate(model, tok, tok.apply_chat_template(chat, add_generation_prompt=True), max_tokens=12)
    assert noted.strip() == "Noted.", noted
    chat += [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "What is the code for locker 7?"}]
    answer = mlx_lm.generate(model, tok, tok.apply_chat_template(chat, add_generation_prompt=True), max_tokens=24)
    assert answer.strip() == "The code for locker 7 is 4821.", answer


@pytest.fixture(scope="module")
def held_out(loaded):
    """Scores of 10 held-out episodes per kind at 512 tokens (computed once)."""
    model, tok = loaded
    runner = MlxRunner(model, eos_ids(tok))
    return {
        k: score(make_episodes(k, 10, 512, 0.5, seed=11, tokenizer=tok), runner, tok) for k in ("recall", "decision")
    }


def _misses(scores) -> list[tuple[str, str]]:
    return [(r.expected, r.generated) for r in scores.rows if not r.correct]


def test_demo_model_decides_from_the_record(held_out) -> None:
    assert held_out["decision"].accuracy >= 0.9, _misses(held_out["decision"])


def test_demo_model_meets_the_recall_target(held_out) -> None:
    # The target, 90% exact recall at 512+ tokens. v4 recalls all 10 of these
    # (99% over the eval grid, docs/demo-model.md); v3 recalled 8, v2 6, v1 guessed (15%).
    assert held_out["recall"].accuracy >= 0.9, _misses(held_out["recall"])


def test_trained_model_remembers_far_better_than_random_weights(loaded) -> None:
    import mlx.core as mx
    from mlx_lm.models import llama

    model, tok = loaded
    config = json.loads((MODEL_DIR / "config.json").read_text())
    mx.random.seed(0)
    random_model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(random_model.parameters())
    episodes = make_episodes("recall", 10, 512, 0.5, seed=11, tokenizer=tok)
    trained = score(episodes, MlxRunner(model, eos_ids(tok)), tok)
    untrained = score(episodes, MlxRunner(random_model, eos_ids(tok)), tok)
    assert untrained.accuracy == 0.0 < trained.accuracy
    assert trained.mean_answer_logprob > untrained.mean_answer_logprob + 30


def test_eval_recall_command_prints_a_table(capsys) -> None:
    parser = argparse.ArgumentParser()
    cmd_eval.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["eval", "recall", "--kind", "decision", "--context", "256", "--depth", "0.5", "--n", "4", "--seed", "3"]
    )
    assert args.model == str(MODEL_DIR)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"decision\s+256\s+0\.50\s+4\s+\d+\.\d%", out), out
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "recall", "--depth", "1.5"])
