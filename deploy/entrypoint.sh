#!/usr/bin/env bash
# Container entrypoint: maps NLD_* environment variables to `python -m server` flags (the
# server reads NLD_<SETTING> variables itself too; see docs/deployment.md) and
# execs the server (so it is PID 1's child-free replacement and receives SIGTERM directly).
#
#   NLD_MODEL              model folder (HF layout). Unset: /models if it holds a
#                          config.json (a mounted volume), else the embedded model
#                          (no --model flag: the server's default).
#   NLD_MODEL_DIR          where a mounted model is looked for (default /models)
#   NLD_HOST / NLD_PORT    bind address (default 0.0.0.0:8000)
#   NLD_API_KEY            read by the server itself (Bearer token required on /v1/*)
#   NLD_SERVED_MODEL_NAME  --served-model-name
#   NLD_DEFAULT_MODE       --default-mode (ar | diffusion | self_spec)
#   NLD_EXTRA_ARGS         more flags, split on whitespace (no quoting; pass arguments
#                          that need quoting after the image name instead)
#   NLD_PYTHON             interpreter (default: python)
#
# Arguments given to the container are appended to the flags; if the first one does not
# start with '-', it is run as a command instead (e.g. `docker run IMAGE bash`).
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

die() { echo "entrypoint: $*" >&2; exit 64; }

py="${NLD_PYTHON:-python}"
host="${NLD_HOST:-0.0.0.0}"
port="${NLD_PORT:-8000}"
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) || die "NLD_PORT must be a port number, got '$port'"

model="${NLD_MODEL:-}"
model_dir="${NLD_MODEL_DIR:-/models}"
if [[ -z "$model" && -f "$model_dir/config.json" ]]; then
    model="$model_dir"
fi

args=(-m server)
if [[ -n "$model" ]]; then
    args+=(--model "$model")
fi
args+=(--host "$host" --port "$port")
# NLD_API_KEY is not mapped: the server reads it (and every NLD_<SETTING>) from the
# environment itself, which keeps the key out of the process list.
if [[ -n "${NLD_SERVED_MODEL_NAME:-}" ]]; then
    args+=(--served-model-name "$NLD_SERVED_MODEL_NAME")
fi
if [[ -n "${NLD_DEFAULT_MODE:-}" ]]; then
    case "$NLD_DEFAULT_MODE" in
        ar|diffusion|self_spec) args+=(--default-mode "$NLD_DEFAULT_MODE") ;;
        *) die "NLD_DEFAULT_MODE must be ar, diffusion or self_spec, got '$NLD_DEFAULT_MODE'" ;;
    esac
fi
if [[ -n "${NLD_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<< "$NLD_EXTRA_ARGS"
    args+=("${extra[@]}")
fi
args+=("$@")

exec "$py" "${args[@]}"
