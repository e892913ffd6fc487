#!/usr/bin/env bash
# Sets up ./.venv on a fresh machine and runs the whole CPU test suite, slow cases included (among them: the
# quickstart notebook, the wheel installed into a fresh venv, ruff). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu  # the suite is CPU-only by design (Pallas kernels run in interpret mode)
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
