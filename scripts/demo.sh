#!/usr/bin/env bash
# The README's main command: sets up ./.venv on a fresh machine and runs `vidaccel demo` on the embedded
# shapes world (tiny trained text-to-video model, dense and accelerated runs). Extra arguments go to the demo.
# JAX picks its backend (a GPU where jax's CUDA plugin is installed, else the CPU); JAX_PLATFORMS=cpu forces
# the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vidaccel demo "$@"
