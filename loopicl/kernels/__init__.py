"""The loop as one fused CPU kernel (`model.kernel = "cpu"`): build, register, differentiate.

`looped_attention.cc` computes the same T loops as `loopicl.linear.model.loop_readouts` (reassociated
form) and their backward pass, with the batch as the SIMD lane; see its header for why.  Its
sibling `candidates.cc` draws and scores the tail-holding sampler's candidate prompts
(`candidate_scores`, `candidate_inputs`, for loopicl/linear/tail_sampling.py): Philox4x32-10
normals made per candidate in the SIMD lanes, never stored.  Both include `simd.h`.  This
module compiles them into one library on first use with the machine's C++ compiler (`-O3
-march=native`, so the library is built for, and cached per, the CPU it runs on), registers its
four handlers with XLA through `jax.ffi`, and wraps the loop's two in a `jax.custom_vjp`.

Cache: $LOOPICL_KERNEL_CACHE, else ~/.cache/loopicl/kernels; one .so per (source, compiler,
flags, JAX headers, CPU features) hash, written to a temporary name and renamed into place, so
concurrent first uses in several processes are safe and a failed build leaves nothing behind.

A build that cannot happen says why in one line (`KernelUnavailable`): a source or header
missing from the installation (checked before compiling: the .cc files, `HEADERS` and every
`#include "…"` they name that is not one of JAX's), no C++ compiler, the compiler's first error
line, an unwritable cache directory, or a library that does not load.  The wheel must ship every
one of these files (pyproject.toml's package-data; tests/test_packaging.py installs the wheel and
runs the kernel from it).  A failure is remembered for the process (`lanes` does not rebuild on
every call), and `model.kernel = "auto"` falls back to XLA with one warning (`warn_xla_fallback`).

$LOOPICL_KERNEL_FLAGS adds compiler flags after the defaults (e.g. `-march=x86-64-v3` to build
for AVX2 machines on an AVX-512 one; tests/test_kernel.py checks that build too).

Limits: float32; CPU devices.  vmap (the seeds of `sweep.train_seeds`) is one call over every
mapped model ("broadcast_all": leading dimensions of P, Q, Z0), its (model, block) pairs shared
by the workers — "sequential" ran the K models one after another through a while loop that
copied each model's residuals: 4 seeds cost 11× one seed's step (d = 10, n = 80, T = 20).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.errors import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("looped_attention.cc", "candidates.cc"))
HEADERS = (os.path.join(_HERE, "simd.h"),)
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"forward": "loopicl_loop_forward", "backward": "loopicl_loop_backward",
            "candidate_scores": "loopicl_candidate_scores",
            "candidate_inputs": "loopicl_candidate_inputs"}


class KernelUnavailable(ConfigError):
  """The fused kernel cannot be built here (one line saying why and what is allowed instead)."""


_PREFIX = "model.kernel='cpu'"
_ALLOWED = "model.kernel='xla'"
_COMPILERS = ("g++", "c++", "clang++")
_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.M)


def _compiler() -> str:
  """$CXX (a name on $PATH or a path), else the first of g++, c++, clang++ on $PATH."""
  requested = os.environ.get("CXX")
  if requested:
    found = shutil.which(requested)
    if not found:
      raise KernelUnavailable(f"{_PREFIX}: the C++ compiler $CXX={requested!r} was not found; allowed: "
                              f"a $CXX that exists, unset $CXX (tries {', '.join(_COMPILERS)}), or {_ALLOWED}")
    return found
  for name in _COMPILERS:
    found = shutil.which(name)
    if found:
      return found
  raise KernelUnavailable(f"{_PREFIX}: no C++ compiler found (tried $CXX, {', '.join(_COMPILERS)}); "
                          f"allowed: install one, or {_ALLOWED}")


def _shown(path: str) -> str:
  """A kernel file as the message names it: loopicl/kernels/<name> when it is one of ours."""
  return f"loopicl/kernels/{os.path.relpath(path, os.path.dirname(SOURCES[0]))}"


def _missing(path: str) -> KernelUnavailable:
  return KernelUnavailable(
      f"{_PREFIX}: the fused CPU kernel's source file {_shown(path)} is missing from this installation "
      f"(looked for {path}); allowed: reinstall loopicl from a wheel or checkout that ships "
      f"loopicl/kernels/*.cc and *.h, or {_ALLOWED}")


def build_inputs(include: str | None = None) -> tuple[str, ...]:
  """Every file the build reads: SOURCES, HEADERS and the `#include "…"` files they name (found
  next to the including file; those under JAX's FFI include directory are JAX's, not ours).
  Raises KernelUnavailable naming the first one that is missing."""
  include = include if include is not None else jax.ffi.include_dir()
  files, pending = [], list(SOURCES + HEADERS)
  while pending:
    path = os.path.normpath(pending.pop(0))
    if path in files:
      continue
    try:
      with open(path, "rb") as f:
        text = f.read()
    except FileNotFoundError:
      raise _missing(path) from None
    except OSError as e:
      raise KernelUnavailable(f"{_PREFIX}: cannot read the kernel source {_shown(path)} ({e}); "
                              f"allowed: reinstall loopicl, or {_ALLOWED}") from None
    files.append(path)
    for name in _INCLUDE.findall(text):
      name = name.decode()
      local = os.path.join(os.path.dirname(path), name)
      if os.path.exists(local) or not os.path.exists(os.path.join(include, name)):
        pending.append(local)  # ours (or nobody's: then it is reported missing, as ours)
  return tuple(files)


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor() + platform.machine()


def _flags() -> tuple[str, ...]:
  return FLAGS + tuple(os.environ.get("LOOPICL_KERNEL_FLAGS", "").split())


def cache_dir() -> str:
  return os.environ.get("LOOPICL_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "loopicl", "kernels")


def library_path() -> str:
  """Builds the kernel library if this machine has no cached build of this source; its path.

  Raises KernelUnavailable (one line naming the cause) when it cannot."""
  include = jax.ffi.include_dir()
  inputs = build_inputs(include)  # before anything else: a missing file is the cause to name
  compiler = _compiler()
  flags = _flags()
  source = b""
  for name in inputs:
    with open(name, "rb") as f:
      source += f.read()
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  except OSError as e:
    raise KernelUnavailable(f"{_PREFIX}: cannot run the C++ compiler {compiler} ({e}); allowed: a "
                            f"working compiler ($CXX), or {_ALLOWED}") from None
  key = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in (
      source, compiler, version, " ".join(flags), include, jax.__version__, _cpu_features()))).hexdigest()
  cache = cache_dir()
  path = os.path.join(cache, f"looped_attention-{key[:20]}.so")
  if os.path.exists(path):
    return path
  try:
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
  except OSError as e:
    raise KernelUnavailable(f"{_PREFIX}: cannot write the kernel cache directory {cache} ({e}); "
                            f"allowed: a writable $LOOPICL_KERNEL_CACHE, or {_ALLOWED}") from None
  try:
    try:
      result = subprocess.run([compiler, *flags, f"-I{include}", *SOURCES, "-o", tmp],
                              capture_output=True, text=True)
    except OSError as e:
      raise KernelUnavailable(f"{_PREFIX}: cannot run the C++ compiler {compiler} ({e}); allowed: a "
                              f"working compiler ($CXX), or {_ALLOWED}") from None
    if result.returncode != 0:
      raise KernelUnavailable(f"{_PREFIX}: building {', '.join(map(os.path.basename, SOURCES))} with "
                              f"{compiler} failed ({_first_error(result)}); allowed: fix the compiler, "
                              f"or {_ALLOWED}")
    try:
      os.replace(tmp, path)
    except OSError as e:
      raise KernelUnavailable(f"{_PREFIX}: cannot write the kernel cache directory {cache} ({e}); "
                              f"allowed: a writable $LOOPICL_KERNEL_CACHE, or {_ALLOWED}") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _first_error(result: subprocess.CompletedProcess) -> str:
  """The compiler's first error line (not its "In file included from" context), else its first line."""
  lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
  for line in lines:
    if re.search(r"\berror\b", line, re.I):
      return line
  return lines[0] if lines else f"exit status {result.returncode}, no output"


_failure: str | None = None  # why the build failed in this process, once it has
_warned = False


def warn_xla_fallback(error: Exception) -> None:
  """`model.kernel = "auto"` could not use the kernel: one warning per process, naming the cause."""
  global _warned
  if not _warned:
    _warned = True
    logging.warning("model.kernel='auto' falls back to 'xla', ~7x slower on a CPU, because the fused "
                    "CPU kernel is unavailable: %s", error)


@functools.cache
def lanes() -> int:
  """Builds and registers the kernel once per process; the SIMD width it was built with.

  A failure (KernelUnavailable) is raised again, not retried, by later calls in this process."""
  global _failure
  if _failure is not None:
    raise KernelUnavailable(_failure)
  try:
    path = library_path()
    try:
      library = ctypes.cdll.LoadLibrary(path)
    except OSError as e:
      raise KernelUnavailable(f"{_PREFIX}: cannot load the built kernel {path} ({e}); allowed: delete "
                              f"it to rebuild, or {_ALLOWED}") from None
  except KernelUnavailable as e:
    _failure = str(e)
    raise
  jax.ffi.register_ffi_target(_TARGETS["forward"], jax.ffi.pycapsule(library.LoopiclForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(_TARGETS["backward"], jax.ffi.pycapsule(library.LoopiclBackward),
                              platform="cpu")
  for name, symbol in (("candidate_scores", library.LoopiclCandidateScores),
                       ("candidate_inputs", library.LoopiclCandidateInputs)):
    jax.ffi.register_ffi_target(_TARGETS[name], jax.ffi.pycapsule(symbol), platform="cpu")
  library.loopicl_lanes.restype = ctypes.c_int64
  return int(library.loopicl_lanes())


def _attributes(n_context: int, d_out: int, loops: int, store: bool, threads: int) -> dict:
  return dict(n_context=np.int64(n_context), d_out=np.int64(d_out), loops=np.int64(loops),
              store=bool(store), threads=np.int64(threads))


def _residual_shape(batch: int, D: int, columns: int, loops: int, store: bool) -> tuple:
  """[blocks, loops, Z_t + G_t + H_t + W_t vectors, lanes]; empty when the backward recomputes."""
  if not store:
    return (0,)
  width = lanes()
  return (-(-batch // width), loops, D * columns + 3 * D * D, width)


def _forward(P, Q, Z0, n_context, d_out, loops, store, threads):
  lanes()  # registered before the call is traced
  batch, D, columns = Z0.shape
  m = columns - n_context
  return jax.ffi.ffi_call(
      _TARGETS["forward"],
      (jax.ShapeDtypeStruct((loops, batch, d_out, m), jnp.float32),
       jax.ShapeDtypeStruct(_residual_shape(batch, D, columns, loops, store), jnp.float32)),
      vmap_method="broadcast_all",
  )(P, Q, Z0, **_attributes(n_context, d_out, loops, store, threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def fused_readouts(P, Q, Z0, n_context: int, d_out: int, loops: int, remat: bool, threads: int):
  """The read-outs of `loops` loops, [loops, batch, d_out, m], as `model.loop_readouts` gives them.

  P, Q: [D, D]; Z0: [batch, D, n_context + m]; all float32.  `remat`: the backward recomputes
  each block's loop states instead of keeping them (memory O(batch·D·n) instead of O(T·…)).
  `threads`: worker threads (0: XLA's intra-op pool size + 1).
  """
  readouts, _ = _forward(P, Q, Z0, n_context, d_out, loops, False, threads)
  return readouts


def _fused_fwd(P, Q, Z0, n_context, d_out, loops, remat, threads):
  readouts, residuals = _forward(P, Q, Z0, n_context, d_out, loops, not remat, threads)
  return readouts, (P, Q, Z0, residuals)


def _fused_bwd(n_context, d_out, loops, remat, threads, saved, readout_cotangent):
  P, Q, Z0, residuals = saved
  return tuple(jax.ffi.ffi_call(
      _TARGETS["backward"],
      (jax.ShapeDtypeStruct(P.shape, jnp.float32), jax.ShapeDtypeStruct(Q.shape, jnp.float32),
       jax.ShapeDtypeStruct(Z0.shape, jnp.float32)),
      vmap_method="broadcast_all",
  )(P, Q, Z0, residuals, readout_cotangent.astype(jnp.float32),
    **_attributes(n_context, d_out, loops, not remat, threads)))


fused_readouts.defvjp(_fused_fwd, _fused_bwd)


def candidate_scores(key_data, count: int, d: int, n: int, iterations: int, threads: int = 0):
  """λ_max((1/n) G_c G_cᵀ) of the candidates c = 0 … count − 1 of `key_data` [..., 2] (uint32) →
  [..., count] float32: candidate c's inputs G_c [d, n] are `prng.philox_normals(key_data, c, d, n)`,
  drawn in the kernel and never stored (candidates.cc); the score is the sampler's power
  iteration with `iterations` products.  Not differentiable (sampling only).  `threads`: 0 is
  XLA's intra-op pool size + 1."""
  lanes()  # registered before the call is traced
  key_data = jnp.asarray(key_data, jnp.uint32)
  return jax.ffi.ffi_call(
      _TARGETS["candidate_scores"],
      jax.ShapeDtypeStruct(key_data.shape[:-1] + (count,), jnp.float32), vmap_method="broadcast_all",
  )(key_data, count=np.int64(count), d=np.int64(d), n=np.int64(n), iterations=np.int64(iterations),
    threads=np.int64(threads))


def candidate_inputs(key_data, chosen, d: int, n: int, threads: int = 0):
  """The inputs G_c [d, n] of the candidates `chosen` [..., k] (int32) of `key_data` [..., 2]:
  [..., k, d, n] float32, bit for bit the ones `candidate_scores` scored."""
  lanes()
  key_data = jnp.asarray(key_data, jnp.uint32)
  chosen = jnp.asarray(chosen, jnp.int32)
  return jax.ffi.ffi_call(
      _TARGETS["candidate_inputs"],
      jax.ShapeDtypeStruct(chosen.shape + (d, n), jnp.float32), vmap_method="broadcast_all",
  )(key_data, chosen, d=np.int64(d), n=np.int64(n), threads=np.int64(threads))
