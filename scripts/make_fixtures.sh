#!/usr/bin/env bash
# Regenerates the diffusers reference fixtures under tests/fixtures/.
# Runs under Python 3.11 with the CPU torch==2.13.0 wheel and a pinned diffusers (the only CPU torch here);
# the Python 3.12 test suite then compares against the committed files and needs no torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIDACCEL_FIXTURE_VENV:-.venv311}
py311=${VIDACCEL_PY311:-$(command -v python3.11 || echo /root/.pyenv/versions/3.11.7/bin/python3.11)}
if [ ! -x "$venv/bin/python" ]; then "$py311" -m venv "$venv"; fi
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -r scripts/fixtures/requirements.txt
for gen in scripts/fixtures/make_*.py; do
  echo "== $gen"
  "$venv/bin/python" "$gen"
done
