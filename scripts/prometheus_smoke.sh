#!/usr/bin/env bash
# Prometheus smoke test by hand: the real server scraped by a real Prometheus.
#
#   scripts/prometheus_smoke.sh [MODEL_DIR]
#
# 1. MODEL_DIR (a Hugging Face folder) is served with `python -m server`; without it, a
#    random tiny NLD checkpoint with its own tokenizer is written to a temp folder
#    (`python -m tests.integration.checkpoint DIR`: no download, no trained model).
# 2. Debian's `prometheus` binary (`apt-get install prometheus`) scrapes the server's
#    /metrics every second, storing its TSDB in the temp folder, both on 127.0.0.1.
# 3. Three chat completions are sent in each mode (ar, diffusion, self_spec).
# 4. Prometheus's HTTP API is queried with `sum by (mode) (nld_generation_tokens_total)`
#    until a non-zero series shows for all three modes (at most $WAIT_S seconds), then the
#    token-weighted TPF by mode is printed.
# Exit code 0 on success, 1 otherwise. Both processes are stopped on exit; the temp folder
# (logs included) is removed unless KEEP=1.
#
# Environment: PYTHON (default .venv/bin/python, else python3), PROMETHEUS (default
# `prometheus`), WAIT_S (default 30), KEEP=1 to keep the temp folder.
# The automated version of this is tests/integration/test_prometheus_scrape.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PROMETHEUS="${PROMETHEUS:-prometheus}"
WAIT_S="${WAIT_S:-30}"
command -v "$PROMETHEUS" >/dev/null || { echo "error: $PROMETHEUS not found (apt-get install prometheus)" >&2; exit 1; }

WORK="$(mktemp -d -t nld-prom-smoke.XXXXXX)"
SERVER_PID="" PROM_PID=""
cleanup() {
  [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null && wait "$PROM_PID" 2>/dev/null || true
  [ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

MODEL="${1:-}"
if [ -z "$MODEL" ]; then
  MODEL="$WORK/tiny-nld"
  PYTHONPATH="$ROOT" "$PYTHON" -m tests.integration.checkpoint "$MODEL" >/dev/null
  echo "wrote a random tiny checkpoint to $MODEL"
fi

SERVER_PORT="$(free_port)"
PROM_PORT="$(free_port)"
SERVER="http://127.0.0.1:$SERVER_PORT"
PROM="http://127.0.0.1:$PROM_PORT"

OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT" \
  "$PYTHON" -m server --model "$MODEL" --port "$SERVER_PORT" --served-model-name smoke --log-level warning \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
start=$(date +%s.%N)
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$SERVER/ready" || true)" = 200 ]; do
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died:"; tail -30 "$WORK/server.log"; exit 1; }
  sleep 0.2
done
awk -v t0="$start" -v t1="$(date +%s.%N)" -v url="$SERVER" 'BEGIN { printf "server ready at %s after %.1f s\n", url, t1 - t0 }'

cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: nld
    static_configs:
      - targets: ["127.0.0.1:$SERVER_PORT"]
EOF
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
until curl -sf "$PROM/-/ready" >/dev/null; do
  kill -0 "$PROM_PID" 2>/dev/null || { echo "prometheus died:"; tail -30 "$WORK/prometheus.log"; exit 1; }
  sleep 0.2
done
echo "prometheus ready at $PROM"

for mode in ar diffusion self_spec; do
  for prompt in "Tell me a story about" "The quick brown fox" "What is the capital of"; do
    curl -sf "$SERVER/v1/chat/completions" -H 'Content-Type: application/json' \
      -d "{\"model\":\"smoke\",\"mode\":\"$mode\",\"max_tokens\":12,\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}]}" \
      >/dev/null || { echo "request in mode $mode failed"; exit 1; }
  done
  echo "sent 3 requests in mode $mode"
done

query() { curl -sfG "$PROM/api/v1/query" --data-urlencode "query=$1"; }
modes_seen() {  # prints the modes with a non-zero value
  "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(" ".join(sorted(s["metric"].get("mode","") for s in r if float(s["value"][1])>0)))'
}
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
  seen="$(query 'sum by (mode) (nld_generation_tokens_total)' | modes_seen || true)"
  [ "$seen" = "ar diffusion self_spec" ] && break
  [ "$(date +%s)" -ge "$deadline" ] && { echo "FAIL: after ${WAIT_S}s Prometheus shows modes: '$seen'"; exit 1; }
  sleep 1
done
echo "sum by (mode) (nld_generation_tokens_total):"
query 'sum by (mode) (nld_generation_tokens_total)' | "$PYTHON" -c 'import json,sys; [print("  %-10s %s" % (s["metric"]["mode"], s["value"][1])) for s in json.load(sys.stdin)["data"]["result"]]'
echo "TPF by mode (generation tokens / forward passes):"
query 'sum by (mode) (nld_generation_tokens_total) / sum by (mode) (nld_forward_passes_total)' \
  | "$PYTHON" -c 'import json,sys; [print("  %-10s %.3f" % (s["metric"]["mode"], float(s["value"][1]))) for s in json.load(sys.stdin)["data"]["result"]]'
echo "OK"
