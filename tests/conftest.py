"""Shared test helpers. Float64 checks use `jax.enable_x64(True)` locally, never globally."""
import os
import sys

# Tests run on the CPU with the host's one device unless a test asks otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
