#!/usr/bin/env bash
# Set up the environment, then run lint, type checks and the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/ruff check adapterhub_local tests benchmarks
.venv/bin/mypy
.venv/bin/pytest "$@"
