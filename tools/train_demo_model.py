"""Train the bundled demo model (assets/models/kvscope-demo) from scratch, on CPU.

Usage (never in CI): `pip install torch==2.13.0` (the `train` extra), then
the shipped model's phases are `tools/demo_model_recipe.sh [out dir]`, one
command per phase (docs/demo-model.md tells what each did).

What it does, reproducibly from --seed:
 1. builds the byte-level BPE tokenizer on the synthetic corpus
    (`kvscope.engine.tasks.corpus.tokenizer_corpus`);
 2. trains a llama-style model in PyTorch (tools/demo_torch_model.py, a
    twin of mlx-lm's llama): first --drill-steps of copy drills (random
    runs of tokens, repeated: only an induction head predicts them), then
    the `train` stream of `kvscope.engine.tasks.corpus.training_chat`
    (chats with notes, facts, records and questions) with a share
    --induction of drills mixed in; loss on answers (and drill repeats)
    plus a down-weighted loss on all other chat tokens;
 3. every --eval-every steps (and after the first step of a --resume run)
    scores held-out episodes (teacher-forced exact match, which equals
    greedy exact match) and exports the model in mlx-lm format, so a usable
    model exists even if the run is cut short; with --keep-best it exports
    only when the sum over the probe's cells beats the best so far, and
    writes the final weights to <out>/last when they were not the best;
 4. writes the curve to <out>/training_log.jsonl.
The learning-rate schedule runs on wall time (warmup, then cosine to 10% at
--minutes), so a time budget, not a step count, ends the run; a --resume run
starts its own schedule (and its own --short-start) over its own --minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_drills import induction_tokens, key_drill_tokens  # noqa: E402
from demo_tokenizer import build_tokenizer  # noqa: E402
from demo_torch_model import Llama, LlamaConfig, export_mlx, grow  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from kvscope.engine.tasks.corpus import ChatMix, training_chat  # noqa: E402
from kvscope.engine.tasks.episodes import make_episodes, prompt_tokens  # noqa: E402
from kvscope.engine.tasks.vocab import NOTED  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "assets" / "models" / "kvscope-demo"
LENGTHS = (256, 512, 1024, 2048)
LENGTH_WEIGHTS = (0.2, 0.35, 0.3, 0.15)
CONTEXT_WEIGHT = 0.2


def chat_tokens(tok, chat, grade_noted: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a training chat and, per token, whether it is a graded answer token.

    With `grade_noted` the assistant's "Noted." replies (and their
    `<|im_end|>`) are graded too, not only weighted as context: the end of
    that turn is then learned at full weight.
    """
    ids: list[int] = []
    graded: list[bool] = []
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, m in enumerate(chat.messages):
        head = tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False)
        body = tok.encode(m["content"], add_special_tokens=False) + [im_end]
        tail = tok.encode("\n", add_special_tokens=False)
        noted = grade_noted and m["role"] == "assistant" and m["content"] == NOTED
        is_answer = i in chat.answer_indices or noted
        ids += head + body + tail
        graded += [False] * len(head) + [is_answer] * len(body) + [False] * len(tail)
    return ids, graded


def make_batch(
    tok,
    mix: ChatMix,
    step: int,
    length: int,
    tokens: int,
    context_weight: float = CONTEXT_WEIGHT,
    fill: bool = False,
    induction: float = 0.0,
    digit_drills: float = 0.0,
    key_drills: float = 0.0,
    grade_noted: bool = False,
):
    """`tokens // length` chats of about `length` tokens, or with `fill` as many as hold `tokens` tokens.

    `fill` keeps a step's size fixed when dense chats (many facts and
    questions) run well past their nominal length.
    """
    seqs: list[tuple[list[int], list[float], list[bool]]] = []
    drills: list[bool] = []
    rng = random.Random(f"induction:{step}")

    def short() -> bool:
        if fill:
            return not seqs or sum(len(s) for s, _, _ in seqs) < tokens
        return len(seqs) < max(1, tokens // length)

    while short():
        drills.append(rng.random() < induction)
        if drills[-1]:
            if key_drills > 0 and rng.random() < key_drills:
                ids_, w = key_drill_tokens(rng, tok, length)
            else:
                ids_, w = induction_tokens(rng, tok, length, digits=digit_drills > 0 and rng.random() < digit_drills)
            seqs.append((ids_, w, [x > 0 for x in w]))
            continue
        ids_, g = chat_tokens(tok, training_chat(step * 1000 + len(seqs), tok, length - 48, mix), grade_noted)
        seqs.append((ids_, [1.0 if x else context_weight for x in g], g))
    batch = len(seqs)
    n = max(len(s) for s, _, _ in seqs)
    ids = torch.zeros((batch, n), dtype=torch.long)
    weight = torch.zeros((batch, n))
    graded = torch.zeros((batch, n), dtype=torch.bool)
    for b, (s, w, g) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        weight[b, : len(s)] = torch.tensor(w)
        graded[b, : len(s)] = torch.tensor(g)
        weight[b, 0] = 0.0
        graded[b, 0] = False
    return ids, weight, graded, torch.tensor(drills)


def step_loss(model: Llama, ids, weight, graded, drill, context_weight: float = CONTEXT_WEIGHT):
    """Loss to minimise and, for the log, chat-answer loss, context loss, drill loss, chat exact match."""
    logits = model(ids[:, :-1])
    tgt, w, g = ids[:, 1:], weight[:, 1:], graded[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(w)
    chat, drilled = g & ~drill[:, None], g & drill[:, None]
    ans = (ce * chat).sum() / chat.sum().clamp(min=1)
    drill_loss = (ce * drilled).sum() / drilled.sum().clamp(min=1)
    all_graded = (ce * g).sum() / g.sum().clamp(min=1)
    ctx_mask = (w > 0) & ~g
    ctx = (ce * ctx_mask).sum() / ctx_mask.sum().clamp(min=1)
    with torch.no_grad():
        right = (logits.argmax(-1) == tgt) | ~g
        # Per chat: every graded token right (all answers of the chat).
        exact = right.all(dim=1)[~drill].float().mean() if (~drill).any() else torch.tensor(float("nan"))
    return all_graded + context_weight * ctx, ans.item(), ctx.item(), drill_loss.item(), exact.item()


@torch.no_grad()
def heldout_exact(model: Llama, tok, episodes) -> float:
    """Teacher-forced exact match of answer + <|im_end|> == greedy exact match."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    hits = 0
    for ep in episodes:
        p = prompt_tokens(tok, ep)
        a = tok.encode(ep.answer, add_special_tokens=False) + [im_end]
        logits = model(torch.tensor([p + a[:-1]]))[0, len(p) - 1 :]
        hits += int(torch.equal(logits.argmax(-1), torch.tensor(a)))
    return hits / len(episodes)


def resume_point(log_path: Path) -> tuple[int, float]:
    """(next step, elapsed seconds) recorded by an earlier run's log."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return rows[-1]["step"] + 1, float(rows[-1]["t"])


def resumed_config(out: Path, rope_theta: float = 0.0) -> LlamaConfig:
    """The saved model's config, with a new RoPE base if `rope_theta` is given.

    Raising the base (adjusted base frequency, as Code Llama did for long
    context) slows the low-frequency rotations, so more of a head's dims
    still match content after thousands of tokens; the weights stay, and
    training adapts the heads to the new angles.
    """
    if rope_theta < 0:
        raise ValueError(f"rope_theta must be positive, got {rope_theta}")
    saved = json.loads((out / "config.json").read_text())
    config = LlamaConfig(**{f: saved[f] for f in LlamaConfig.__dataclass_fields__})
    return replace(config, rope_theta=rope_theta) if rope_theta else config


def lr_at(frac: float, peak: float, warmup: float = 0.03) -> float:
    if frac < warmup:
        return peak * frac / warmup
    t = min(1.0, (frac - warmup) / (1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(t * 3.14159265)).item()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--minutes", type=float, default=38.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="transformer layers (ignored with --resume)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (ignored with --resume)")
    ap.add_argument("--heads", type=int, default=4, help="query heads, half as many KV heads (ignored with --resume)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="chat lengths in tokens")
    ap.add_argument("--length-weights", default=",".join(map(str, LENGTH_WEIGHTS)))
    ap.add_argument(
        "--short-start",
        type=float,
        default=0.15,
        help="fraction of this run's --minutes that uses only the first two --lengths",
    )
    ap.add_argument("--max-questions", type=int, default=ChatMix.max_questions)
    ap.add_argument("--repeat-facts", type=float, default=ChatMix.repeat_facts)
    ap.add_argument("--min-facts", type=int, default=ChatMix.min_facts)
    ap.add_argument("--facts-per-128", type=int, default=ChatMix.facts_per_128)
    ap.add_argument(
        "--same-kind", type=float, default=ChatMix.same_kind, help="chance a chat adds 4-10 facts of one kind"
    )
    ap.add_argument("--context-weight", type=float, default=CONTEXT_WEIGHT, help="loss weight of non-answer tokens")
    ap.add_argument("--fill-tokens", action="store_true", help="fill each step to --tokens-per-step real tokens")
    ap.add_argument(
        "--induction", type=float, default=0.0, help="share of a step's sequences that are copy drills (repeated runs)"
    )
    ap.add_argument("--digit-drills", type=float, default=0.0, help="share of copy drills whose runs are digits only")
    ap.add_argument("--summaries", type=float, default=0.0, help="share of chats with a [summary] turn (ChatMix)")
    ap.add_argument("--grade-noted", action="store_true", help='grade the "Noted." replies like answers')
    ap.add_argument("--key-drills", type=float, default=0.0, help="share of drills that are multi-token-key lookups")
    ap.add_argument(
        "--grow-at",
        default="",
        help="with --resume: insert fresh layers at these indices of the new stack (zero output, so nothing changes at first)",
    )
    ap.add_argument(
        "--drill-steps", type=int, default=0, help="first steps that are copy drills only (64-token sequences)"
    )
    ap.add_argument("--probe-n", type=int, default=10, help="held-out episodes per probe cell")
    ap.add_argument("--probe-cells", default="recall@512,recall@1024,recall@2048,decision@1024")
    ap.add_argument(
        "--keep-best",
        action="store_true",
        help="export only when the held-out probe (sum over --probe-cells) improves on the best so far",
    )
    ap.add_argument("--resume", action="store_true", help="continue from the weights in --out (fresh optimizer)")
    ap.add_argument(
        "--rope-theta",
        type=float,
        default=0.0,
        help="RoPE base (new model or, with --resume, a changed base to adapt to: adjusted base frequency)",
    )
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    mix = ChatMix(
        args.max_questions, args.repeat_facts, args.min_facts, args.facts_per_128, args.same_kind, args.summaries
    )
    lengths = [int(x) for x in args.lengths.split(",")]
    weights = [float(x) for x in args.length_weights.split(",")]
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    if not args.resume:
        build_tokenizer(args.out, vocab_size=LlamaConfig().vocab_size)
    tok = AutoTokenizer.from_pretrained(str(args.out))
    if args.resume:
        config = resumed_config(args.out, args.rope_theta)
    else:
        config = LlamaConfig(
            vocab_size=len(tok),
            num_hidden_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads // 2,
            head_dim=args.hidden // args.heads,
            rope_theta=args.rope_theta or LlamaConfig.rope_theta,
        )
    model = Llama(config)
    if args.resume:
        model.load_state_dict(load_file(str(args.out / "model.safetensors")))
        if args.grow_at:
            model = grow(model, [int(i) for i in args.grow_at.split(",")])
            config = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    cells = [c.split("@") for c in args.probe_cells.split(",")]
    held = {f"{k}@{n}": make_episodes(k, args.probe_n, int(n), 0.5, 7, tok) for k, n in cells}
    log_path = args.out / "training_log.jsonl"
    first_step, t0 = resume_point(log_path) if args.resume else (0, 0.0)
    log = log_path.open("a" if args.resume else "w")
    start = time.time() - t0
    best = -1.0

    def probe_score(r: dict) -> float:
        return sum(v for k, v in r.items() if k.startswith("heldout_"))

    def maybe_export(r: dict) -> None:
        nonlocal best
        if not args.keep_best or probe_score(r) > best:
            best = max(best, probe_score(r))
            export_mlx(model, args.out, tok.eos_token_id, tok.bos_token_id)
            r["exported"] = True

    budget = args.minutes * 60
    step = first_step
    while step - first_step < args.max_steps and time.time() - start - t0 < budget:
        frac = (time.time() - start - t0) / budget
        length = rng.choice(lengths[:2]) if frac < args.short_start else rng.choices(lengths, weights)[0]
        drilling = step < args.drill_steps
        if drilling:
            length = 64
        ids, weight, graded, drill = make_batch(
            tok,
            mix,
            step,
            length,
            args.tokens_per_step,
            args.context_weight,
            args.fill_tokens,
            1.0 if drilling else args.induction,
            args.digit_drills,
            args.key_drills,
            args.grade_noted,
        )
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, args.lr)
        loss, ans, ctx, drill_loss, exact = step_loss(model, ids, weight, graded, drill, args.context_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = {
            "step": step,
            "t": round(time.time() - start, 1),
            "len": length,
            "loss_answer": round(ans, 4),
            "loss_context": round(ctx, 4),
            "loss_drill": round(drill_loss, 4),
            "train_exact": exact,
        }
        if step % args.eval_every == 0 or step == first_step or time.time() - start - t0 >= budget:
            model.eval()
            row |= {f"heldout_{k}": heldout_exact(model, tok, eps) for k, eps in held.items()}
            model.train()
            maybe_export(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)
        step += 1
    model.eval()
    row = {"step": step, "t": round(time.time() - start, 1), "final": True}
    row |= {f"heldout_{k}": heldout_exact(model, tok, eps) for k, eps in held.items()}
    maybe_export(row)
    if not row.get("exported"):
        # The probe is small and noisy: keep the last weights too, to compare on more episodes.
        export_mlx(model, args.out / "last", tok.eos_token_id, tok.bos_token_id)
        row["exported_last"] = str(args.out / "last")
    log.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    print(f"done after {step} steps; best probe {best:.2f} exported to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
