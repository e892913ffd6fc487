#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (jax >= 0.11 needs it), or fails with a message.
for c in "${VIDACCEL_PYTHON:-}" python3.13 python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 \
         /root/.pyenv/versions/3.13*/bin/python3.13 /usr/bin/python3.12 python3; do
  [ -n "$c" ] || continue
  if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    command -v "$c" 2>/dev/null || echo "$c"; exit 0
  fi
done
echo "vidaccel needs Python >= 3.12 (jax >= 0.11); none found. Set VIDACCEL_PYTHON=/path/to/python3.12." >&2
exit 1
