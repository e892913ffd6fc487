#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs vidaccel (editable) with its test and plots extras.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/find_python.sh)
if [ ! -x .venv/bin/python ]; then "$py" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,plots]"
