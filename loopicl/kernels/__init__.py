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
import os
import platform
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


def _compiler() -> str:
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not compiler:
    raise KernelUnavailable("model.kernel='cpu' needs a C++ compiler (g++, c++ or clang++, or $CXX); "
                            "allowed: install one, or model.kernel='xla'")
  return compiler


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


def library_path() -> str:
  """Builds the kernel library if this machine has no cached build of this source; its path."""
  try:
    return _build()
  except OSError as e:  # an unwritable cache, a compiler that cannot start
    raise KernelUnavailable(f"model.kernel='cpu': cannot build the kernel ({e}); allowed: a "
                            "writable $LOOPICL_KERNEL_CACHE, or model.kernel='xla'") from None


def _build() -> str:
  compiler = _compiler()
  flags = _flags()
  include = jax.ffi.include_dir()
  source = b""
  for name in SOURCES + HEADERS:
    with open(name, "rb") as f:
      source += f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in (
      source, compiler, version, " ".join(flags), include, jax.__version__, _cpu_features()))).hexdigest()
  cache = os.environ.get("LOOPICL_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "loopicl", "kernels")
  path = os.path.join(cache, f"looped_attention-{key[:20]}.so")
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
  os.close(fd)
  try:
    result = subprocess.run([compiler, *flags, f"-I{include}", *SOURCES, "-o", tmp],
                            capture_output=True, text=True)
    if result.returncode != 0:
      first = (result.stderr.strip().splitlines() or ["no output"])[0]
      raise KernelUnavailable(f"model.kernel='cpu': building {', '.join(map(os.path.basename, SOURCES))} failed "
                              f"({first}); allowed: fix the compiler, or model.kernel='xla'")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def lanes() -> int:
  """Builds and registers the kernel once per process; the SIMD width it was built with."""
  library = ctypes.cdll.LoadLibrary(library_path())
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
