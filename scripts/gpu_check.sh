#!/usr/bin/env bash
# The prepared GPU run (issue 19) on the device machine: system python3, no venv, no pip install.
#   bash scripts/gpu_check.sh [OUT] [extra gpu_report args]      (OUT defaults to $OUT, else results/gpu)
# Writes OUT/report.json, report.md, gpu_report.log and parts/; about 8 minutes (--budget-s 480).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/gpu}}"
shift || true
JAX_PLATFORMS=cuda PYTHONPATH=. exec python3 -m experiments.gpu_report --out "$out" "$@"
