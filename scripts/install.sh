#!/usr/bin/env bash
# Installs loopicl and everything it needs. Shared by .ci/run and the Dockerfile.
#   LOOPICL_VENV=path   where to create the virtual environment (default .venv; "none": system python)
#   LOOPICL_JAX=cpu|cuda12|cuda13   which jax build to install (default cpu)
#   LOOPICL_CONSTRAINTS=file|none    pinned versions (default constraints.txt, the tested set;
#                                    none: the newest releases pyproject.toml allows)
set -euo pipefail
cd "$(dirname "$0")/.."
constraints="${LOOPICL_CONSTRAINTS:-constraints.txt}"
pins=()
[ "$constraints" = "none" ] || pins=(-c "$constraints")
venv="${LOOPICL_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ "$venv" != "none" ]; then
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  python="$venv/bin/python"
fi
"$python" -m pip install -q --upgrade pip
case "${LOOPICL_JAX:-cpu}" in
  cpu) ;;
  cuda12|cuda13) "$python" -m pip install -q "${pins[@]}" "jax[${LOOPICL_JAX}]" ;;
  *) echo "LOOPICL_JAX=${LOOPICL_JAX} is invalid; allowed: cpu | cuda12 | cuda13" >&2; exit 2 ;;
esac
"$python" -m pip install -q "${pins[@]}" -e ".[test]"
"$python" -c "import jax, flax, optax, orbax.checkpoint, loopicl; print('loopicl', loopicl.__version__, 'jax', jax.__version__, jax.devices())"
# Build the fused CPU kernel (model.kernel = auto | cpu) now rather than at the first run; without
# a C++ compiler loopicl still works, on the plain XLA path.
"$python" -c "from loopicl import kernels; print('cpu kernel:', kernels.lanes(), 'lanes')" \
  || echo "warning: the fused CPU kernel did not build; model.kernel='auto' will use 'xla'" >&2
