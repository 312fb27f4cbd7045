#!/usr/bin/env bash
# Sets everything up, then serves the default model (SmolLM2-135M-Instruct) on port 9977.
# Extra arguments go to `xllm serve`, e.g. --served-model-name Qwen2-7B-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec xllm serve --model default --port 9977 "$@"
