#!/usr/bin/env bash
# The GPU check of the issue "On a real GPU" (see tools/gpu_check.py for the stages):
#   tools/gpu_check.sh             on a GPU machine: one run, ~6-8 minutes on one GPU, log + JSON under $OUT
#   tools/gpu_check.sh --dry-run   the same stages on CPU at tiny sizes
# On the lent GPU machine (python3 = its torch; no megatron-core, no network): carry .whl, e.g.
#   run(command="tools/gpu_check.sh", carry=[".whl"], timeout_s=600)
# The driver installs .whl/*.whl into /tmp/site itself when megatron-core does not import.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY="$VIRTUAL_ENV/bin/python"; else PY=python3; fi
fi
exec "$PY" -u tools/gpu_check.py --python "$PY" "$@"
