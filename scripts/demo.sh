#!/usr/bin/env bash
# The README's main command: sets up ./.venv on a fresh machine and runs `vidaccel demo` on the embedded
# shapes world (tiny trained text-to-video model, dense and accelerated runs). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/vidaccel demo "$@"
