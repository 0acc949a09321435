#!/usr/bin/env bash
# The prepared script of a lent GPU session (one `device` run; ~9 minutes):
#   1. benchmarks/gpu_check.py (kernel checks, attention timings, 8B-shaped steps, profile);
#   2. a self-distillation round of the embedded model with its training steps on the GPU, from
#      trajectories decoded on the CPU beforehand (the engine evaluations run on the GPU host's CPU).
# Usage on the GPU host, from the repository root:  scripts/gpu_session.sh CARRY_DIR
# CARRY_DIR holds data.npz (training.train --prepare-only), trajectories.npz and
# heldout_trajectories.npz (training.distill --generate-only). Prepare it here with
#   scripts/gpu_session.sh --prepare CARRY_DIR DATA.npz TRAJECTORY_RUN_DIR...
# Results go to $OUT in at most 8 files (the device tool's limit): gpu_check/{log.txt,
# results.json,table.md}, distill.log and the distilled run (final/ and best/ weights, logs) as a
# tar cut into 4 parts (each under 16 MiB): cat weights.tar.part-* | tar -x
# Environment: MODEL (the folder to distill, default server/default_model; the third round's
# second run started from the first run's export), DISTILL_MINUTES, GPU_CHECK_S, DISTILL_S,
# DEVICE and THREADS (DEVICE=cpu THREADS=1 DISTILL_MINUTES=0.4 is a dry run on any machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  carry=${2:?carry dir}; data=${3:?data.npz}; shift 3
  mkdir -p "$carry"
  cp "$data" "$carry/data.npz"
  # several trajectory runs merged into one file (int32: half the bytes to carry)
  "$PY" - "$carry" "$@" <<'EOF'
import sys
from pathlib import Path

import numpy as np

carry, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
parts = [np.load(run / "trajectories.npz") for run in runs]
np.savez(carry / "trajectories.npz", **{k: np.concatenate([p[k] for p in parts]).astype(np.int32)
                                       for k in ("tokens", "target_start", "kind")})
held = np.load(runs[0] / "heldout_trajectories.npz")
np.savez(carry / "heldout_trajectories.npz", **{k: held[k].astype(np.int32) for k in held.files})
print(f"{sum(len(p['tokens']) for p in parts)} trajectories from {len(runs)} runs -> {carry}")
EOF
  exit $?
fi

CARRY=${1:?carry dir}
OUT=${OUT:-/tmp/gpu_session}
RUN=${RUN:-/tmp/distill_gpu}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/gpu_check" "$RUN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

start=$(date +%s)
timeout "${GPU_CHECK_S:-330}" "$PY" benchmarks/gpu_check.py --out "$OUT/gpu_check" --budget-s 280 > "$OUT/gpu_check/log.txt" 2>&1
echo "gpu_check rc=$? after $(( $(date +%s) - start )) s"
tail -n 80 "$OUT/gpu_check/log.txt"

cp "$CARRY/trajectories.npz" "$CARRY/heldout_trajectories.npz" "$RUN/"
timeout "${DISTILL_S:-260}" "$PY" -m training.distill --model "${MODEL:-server/default_model}" --data "$CARRY/data.npz" --out "$RUN" \
  --device "${DEVICE:-cuda}" --threads "${THREADS:-8}" --minutes "${DISTILL_MINUTES:-3.2}" --traj-rows 48 --real-rows 24 --lr 2e-4 --ar-weight 48 \
  --warmup-steps 50 --block-sizes 4 8 8 8 16 16 --eval-block 8 --eval-threshold 0.7 --eval-minutes 0.5 \
  --ckpt-minutes 1000 --log-every 50 --keep-best > "$OUT/distill.log" 2>&1
echo "distill rc=$? after $(( $(date +%s) - start )) s"
grep '"eval"' "$OUT/distill.log" | tail -n 12
tail -n 3 "$OUT/distill.log"
(cd "$RUN" && tar -cf /tmp/distill_run.tar --exclude=ckpt --exclude='*.npz' .)
split -n 4 /tmp/distill_run.tar "$OUT/weights.tar.part-"
ls -la "$OUT" "$OUT/gpu_check"
