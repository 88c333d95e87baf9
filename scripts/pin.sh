#!/usr/bin/env bash
# Refreshes constraints.txt: installs the newest releases pyproject.toml allows into a fresh
# virtual environment, runs the default test suite there, and only if it passes rewrites
# constraints.txt with that environment's exact versions.  Review the diff, then commit it.
#   bash scripts/pin.sh            (a few minutes: install + the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
LOOPICL_VENV="$venv" LOOPICL_CONSTRAINTS=none bash scripts/install.sh
"$venv/bin/python" -m pytest -q
{
  echo "# Exact versions the test suite last passed with ($("$venv/bin/python" --version), CPU, $(date +%Y-%m-%d))."
  echo "# scripts/install.sh installs with these as constraints (pip -c); pyproject.toml keeps ranges."
  echo "# Refresh: bash scripts/pin.sh (fresh venv, newest releases allowed by pyproject.toml, tests, then"
  echo "# rewrites this file); commit it only after the test suite passes with it."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v "^loopicl" | sort -f
} > constraints.txt
echo "constraints.txt rewritten; review with: git diff constraints.txt"
