#!/usr/bin/env bash
# The shipped demo model's training phases (docs/demo-model.md), in order.
# Never in CI: several hours on 2 CPU cores (the --minutes budgets are wall
# time). Each --resume phase continues from the weights in --out, which with
# --keep-best are the best probe's export. Usage: tools/demo_model_recipe.sh [out dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/demo}

python -c 'import torch' || { echo 'needs PyTorch: pip install torch==2.13.0 (the train extra)' >&2; exit 1; }
python tools/train_demo_model.py --out "$OUT" --layers 2 --heads 8 --threads 1 \
    --minutes 35 --max-steps 1001 --lr 3e-3 --drill-steps 500 \
    --lengths 128,256,512 --length-weights 0.4,0.4,0.2 --max-questions 12 \
    --repeat-facts 0.5 --min-facts 6 --facts-per-128 3 --induction 0.25 \
    --fill-tokens --probe-n 16 --probe-cells recall@512,decision@512
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 72 --max-steps 500 --lr 3e-3 --lengths 256,512 --length-weights 0.5,0.5 \
    --max-questions 8 --repeat-facts 0.3 --min-facts 4 --facts-per-128 2 \
    --induction 0.1 --fill-tokens --probe-n 16 \
    --probe-cells recall@512,recall@2048,decision@1024 --keep-best
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 33 --short-start 0 --lr 2e-3 --lengths 256,512,1024,2048 \
    --length-weights 0.1,0.25,0.3,0.35 --max-questions 8 --repeat-facts 0.3 \
    --min-facts 4 --facts-per-128 2 --induction 0.1 --fill-tokens --probe-n 16 \
    --probe-cells recall@512,recall@2048,decision@1024 --keep-best
# v3: grow a middle layer into the 2-layer v2 (phases above), then train on
# hard distractors and digit drills; the first command was stopped by hand
# after 22 min (its schedule was for 95) and the second resumed from its best
# export.
python tools/train_demo_model.py --out "$OUT" --resume --grow-at 1 --threads 2 \
    --minutes 95 --short-start 0 --lr 1.5e-3 --lengths 512,1024,2048 \
    --length-weights 0.3,0.35,0.35 --max-questions 8 --repeat-facts 0.3 --min-facts 4 \
    --facts-per-128 2 --induction 0.1 --digit-drills 0.5 --fill-tokens --probe-n 16 \
    --probe-cells recall@512,recall@1024,recall@2048,decision@1024 --keep-best
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 65 --short-start 0 --lr 1.5e-3 --lengths 256,512,1024,2048 \
    --length-weights 0.2,0.3,0.25,0.25 --max-questions 8 --repeat-facts 0.3 --min-facts 4 \
    --facts-per-128 2 --same-kind 0.6 --induction 0.1 --digit-drills 0.5 --fill-tokens \
    --probe-n 16 --probe-cells recall@512,recall@1024,recall@2048,decision@1024 --keep-best
# then 6 min of short and long chats at a low lr, so 2-line notes get "Noted."
# (phase 5 had no chat under 256 tokens); the final weights are v3.
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 6 --short-start 0 --lr 5e-4 --lengths 96,128,256,512,1024,2048 \
    --length-weights 0.15,0.15,0.15,0.2,0.15,0.2 --max-questions 8 --repeat-facts 0.3 \
    --min-facts 2 --facts-per-128 2 --same-kind 0.3 --induction 0.1 --digit-drills 0.5 \
    --fill-tokens --eval-every 100000 --probe-n 16 \
    --probe-cells recall@512,recall@2048,decision@1024
# v4: raise the RoPE base of v3 from 10000 to 100000 (adjusted base
# frequency) and train on hard distractors again; the best probe (step
# 10750) is kept. Then short chats again, as after phase 5, and then the
# same with "Noted." graded (without, notes got "Noted." and more notes).
python tools/train_demo_model.py --out "$OUT" --resume --rope-theta 100000 --threads 2 \
    --minutes 55 --short-start 0 --lr 1.5e-3 --lengths 256,512,1024,2048 \
    --length-weights 0.2,0.3,0.25,0.25 --max-questions 12 --repeat-facts 0.3 --min-facts 4 \
    --facts-per-128 2 --same-kind 0.7 --induction 0.05 --digit-drills 0.3 --key-drills 0.5 \
    --fill-tokens --eval-every 250 --probe-n 24 \
    --probe-cells recall@512,recall@1024,recall@2048,decision@1024 --keep-best
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 8 --short-start 0 --lr 5e-4 --lengths 96,128,256,512,1024,2048 \
    --length-weights 0.15,0.15,0.15,0.2,0.15,0.2 --max-questions 12 --repeat-facts 0.3 \
    --min-facts 2 --facts-per-128 2 --same-kind 0.5 --induction 0.05 --digit-drills 0.3 \
    --key-drills 0.5 --fill-tokens --eval-every 100000 --probe-n 24 \
    --probe-cells recall@512,recall@1024,recall@2048,decision@1024
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 5 --short-start 0 --lr 5e-4 --lengths 96,128,256,512,1024,2048 \
    --length-weights 0.15,0.15,0.15,0.2,0.15,0.2 --max-questions 12 --repeat-facts 0.3 \
    --min-facts 2 --facts-per-128 2 --same-kind 0.5 --induction 0.05 --digit-drills 0.3 \
    --key-drills 0.5 --fill-tokens --eval-every 100000 --probe-n 24 --grade-noted \
    --probe-cells recall@512,recall@1024,recall@2048,decision@1024
# then teach it the "[summary] ..." turn that compaction and restart write
# (v4 before this read it right in 7 of 10 restarts); the final weights are v4.
python tools/train_demo_model.py --out "$OUT" --resume --threads 2 \
    --minutes 8 --short-start 0 --lr 5e-4 --lengths 96,128,256,512,1024,2048 \
    --length-weights 0.15,0.15,0.15,0.2,0.15,0.2 --max-questions 12 --repeat-facts 0.3 \
    --min-facts 2 --facts-per-128 2 --same-kind 0.5 --summaries 0.3 --induction 0.05 \
    --digit-drills 0.3 --key-drills 0.5 --fill-tokens --eval-every 100000 --probe-n 24 --grade-noted \
    --probe-cells recall@512,recall@1024,recall@2048,decision@1024
