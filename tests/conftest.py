"""Shared test helpers. Float64 checks use `jax.enable_x64(True)` locally, never globally."""
import os
import sys

# Tests run on the CPU with the host's one device unless a test asks otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# One compilation cache per test session (per xdist worker).  Many tests compile the same small
# programs (the same config shapes through fresh closures: every run builds its own jitted step),
# and XLA's cache is keyed on the program itself, so each compiles once (test_train.py +
# test_sweep_runs.py: 175 s -> 151 s).  A fresh folder each session: nothing carries over between
# runs.  The environment reaches the CLI tests' subprocesses too.
if "LOOPICL_TEST_JAX_CACHE" not in os.environ:
  import tempfile
  os.environ["LOOPICL_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="loopicl-test-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["LOOPICL_TEST_JAX_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
