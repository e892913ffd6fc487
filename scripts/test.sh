#!/usr/bin/env bash
# Sets up ./.venv on a fresh machine and runs the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
