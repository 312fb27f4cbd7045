#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (kernels, engine vs transformers, API).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .
exec python -m pytest -q "$@"
