#!/usr/bin/env bash
# The one-GPU acceptance check of an installation (the stages: tools/gpu_check.py):
#   tools/gpu_check.sh             on a machine with one GPU: about 6-8 minutes, log + JSON under $OUT
#                                  (default runs/gpu_check)
#   tools/gpu_check.sh --dry-run   the same stages on CPU at tiny sizes
#   tools/gpu_check.sh --plan      the stages and their commands
# Runs from the checkout with the interpreter of the active virtual environment ($PYTHON overrides it).
# Without network access and without megatron-core: put its wheel in .whl/ and the check installs it
# into /tmp/site for its own stages.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY="$VIRTUAL_ENV/bin/python"; else PY=python3; fi
fi
exec "$PY" -u tools/gpu_check.py --python "$PY" "$@"
