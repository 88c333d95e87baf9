#!/usr/bin/env bash
# The heavier checks the default test run leaves out (pytest -m slow): the concept recipe reaching
# its targets, a long sharded run, every benchmark mode, the reproduce grid in per_loops mode,
# the SIGKILL variant of the CLI resume test (scripts/device_check.sh --cpu covers that path too).
# About 5-10 minutes on a 2-core CPU.
#   bash scripts/test_slow.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
exec "$python" -m pytest -m slow "$@"
