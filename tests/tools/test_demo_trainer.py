"""The demo model's trainer (tools/): only where PyTorch, the `train` extra, is installed."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from demo_torch_model import Llama, LlamaConfig, grow  # noqa: E402


def small() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64))


def test_grown_model_computes_what_the_original_did_until_trained() -> None:
    model = small()
    ids = torch.randint(0, 64, (2, 24))
    grown = grow(model, [1, 3])
    assert grown.config.num_hidden_layers == 4
    assert torch.allclose(grown(ids), model(ids), atol=1e-6)
    # The old layers sit at 0 and 2, in order, with their weights.
    for new, old in ((0, 0), (2, 1)):
        assert torch.equal(
            grown.model.layers[new].self_attn.q_proj.weight, model.model.layers[old].self_attn.q_proj.weight
        )
    # And the new layers learn: one step moves the output off the original.
    opt = torch.optim.SGD(grown.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(grown(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    assert grown.model.layers[1].self_attn.o_proj.weight.abs().sum() > 0


@pytest.mark.parametrize("at", [[5], [1, 1], [-1]])
def test_grow_rejects_bad_positions(at) -> None:
    with pytest.raises(ValueError, match="new layer indices"):
        grow(small(), at)


def test_digit_drill_repeats_a_digit_run() -> None:
    from demo_drills import induction_tokens
    from transformers import AutoTokenizer

    from kvscope.engine.tasks import demo_model_path

    tok = AutoTokenizer.from_pretrained(str(demo_model_path()))
    ids, weight = induction_tokens(random.Random(3), tok, 96, digits=True)
    text = tok.decode(ids[1:])
    assert len(ids) == 96 and set(text) <= set("0123456789")
    start = weight.index(1.0)
    end = next((i for i in range(start, 96) if weight[i] == 0.0), 96)
    # The graded tokens are copies of the run that opened the drill.
    runs = [n for n in range(6, start) if ids[start : start + n] == ids[1 : 1 + n]]
    assert runs, "the first graded tokens do not repeat the opening run"
    n = runs[-1]
    assert all(ids[i] == ids[i - n] for i in range(start + n, end))


def test_key_drill_values_follow_only_from_the_name_four_tokens_back() -> None:
    from demo_drills import key_drill_tokens
    from transformers import AutoTokenizer

    from kvscope.engine.tasks import demo_model_path

    tok = AutoTokenizer.from_pretrained(str(demo_model_path()))
    newline = tok.encode("\n", add_special_tokens=False)[0]
    ids, weight = key_drill_tokens(random.Random(5), tok, 400)
    lines, cur = [], []
    for t, w in zip(ids[1:], weight[1:], strict=True):
        if t == newline:
            lines.append(cur)
            cur = []
        else:
            cur.append((t, w))
    listed = {}
    for line in lines:
        name = line[0][0]
        graded = [t for t, w in line if w > 0]
        if not graded:
            listed.setdefault(name, [t for t, _ in line])
            continue
        # An asked line repeats the listed line of the same name, and its value is what is graded.
        assert [t for t, _ in line] == listed[name]
        assert line[-len(graded) :] == [(t, 1.0) for t in graded]
    shapes = {tuple(line[1:3]) for line in listed.values()}
    assert len(listed) >= 4 and len(shapes) == 1, "every record shares the same middle tokens"


def test_resume_with_a_new_rope_base_keeps_the_weights_and_moves_only_positions(tmp_path) -> None:
    from dataclasses import replace

    from demo_torch_model import export_mlx
    from train_demo_model import resumed_config

    model = small()
    export_mlx(model, tmp_path, eos_token_id=2, bos_token_id=0)
    assert resumed_config(tmp_path) == model.config
    config = resumed_config(tmp_path, rope_theta=1e5)
    assert config == replace(model.config, rope_theta=1e5)
    moved = Llama(config)
    moved.load_state_dict(model.state_dict())
    ids = torch.randint(3, 64, (1, 24))
    with torch.no_grad():
        before, after = model(ids), moved(ids)
    # Position 0 is not rotated, so only later positions see the new base.
    assert torch.allclose(before[:, 0], after[:, 0], atol=1e-5)
    assert (before[:, 1:] - after[:, 1:]).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="rope_theta"):
        resumed_config(tmp_path, rope_theta=-1.0)


def test_grade_noted_grades_the_noted_reply_and_its_end_of_turn() -> None:
    from train_demo_model import chat_tokens
    from transformers import AutoTokenizer

    from kvscope.engine.tasks import demo_model_path
    from kvscope.engine.tasks.corpus import TrainingChat

    tok = AutoTokenizer.from_pretrained(str(demo_model_path()))
    chat = TrainingChat(
        [
            {"role": "user", "content": "Notes:\nTeam Falcon meets in room 212."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Which room does team Falcon meet in?"},
            {"role": "assistant", "content": "Team Falcon meets in room 212."},
        ],
        answer_indices=(3,),
    )
    ids, plain = chat_tokens(tok, chat)
    ids_noted, graded = chat_tokens(tok, chat, grade_noted=True)
    assert ids_noted == ids

    def text(flags):
        return tok.decode([t for t, f in zip(ids, flags, strict=True) if f])

    assert text(plain) == "Team Falcon meets in room 212.<|im_end|>"
    assert text(graded) == "Noted.<|im_end|>Team Falcon meets in room 212.<|im_end|>"
