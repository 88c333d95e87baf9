"""Threefry on the CPU as one fused kernel instead of a 5-round loop (same bits).

JAX lowers its threefry2x32 PRNG on the CPU as a `fori_loop` over the 5 rounds (smaller
programs), and XLA runs that loop as ~15 small kernels and copies per random draw.  Every
training step samples its prompts on device (batch · d · n normals), so at the paper-like
config that loop was ~25% of a step once the model itself ran in the fused kernel.  The
unrolled lowering — the one JAX uses on GPUs — computes the same rounds in the same order, so
the bits are identical (tests/test_kernel.py, test_unrolled_threefry_draws_the_same_bits_as_plain_jax,
checks it against a fresh process without it), and XLA fuses it into one kernel: 2.5× faster
sampling at batch 256, d = 20, n = 40.

It goes through JAX internals (`jax._src`); when they change, `use_unrolled_threefry` leaves the
default lowering in place and returns False.  `normal` is the other CPU-layout fix: the same
normals, drawn flat.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.cache
def use_unrolled_threefry() -> bool:
  """Registers JAX's unrolled threefry lowering for the CPU (idempotent); whether it took."""
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32
    mlir.register_lowering(threefry2x32.threefry2x32_p,
                           threefry2x32._threefry2x32_lowering_rule, platform="cpu")
  except (ImportError, AttributeError):
    return False
  return True


def normal(key, shape: tuple[int, ...], dtype):
  """jax.random.normal(key, shape, dtype), the same numbers, drawn as one flat vector.

  Why: on the CPU XLA vectorises the normal's inverse-error-function transform along the last
  axis, so a draw whose last axis is short (d = 10) runs ~8x slower than the same count drawn
  flat (4096·10·10 normals: 11 ms against 1.3 ms).  Threefry's counters run over the row-major
  flattened index, so the flat draw reshaped is bit for bit the shaped one (tests/test_kernel.py,
  test_flat_normal_draws_the_same_numbers_as_the_shaped_draw).
  """
  size = 1
  for s in shape:
    size *= int(s)
  return jax.random.normal(key, (size,), dtype).reshape(shape)


# -- Philox4x32-10 normals by (key, candidate, element): the tail-holding sampler's candidates ----

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's multipliers and Weyl key increments
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(high, low) 32 bits of a · x for the constant a and uint32 x, in uint32 arithmetic only (no
  64-bit integers without jax_enable_x64): 16-bit limbs, every partial sum below 2^32."""
  a0, a1 = a & 0xFFFF, a >> 16
  x0, x1 = x & 0xFFFF, x >> 16
  t = x0 * jnp.uint32(a0)
  m1 = x1 * jnp.uint32(a0) + (t >> 16)
  m2 = x0 * jnp.uint32(a1) + (m1 & 0xFFFF)
  return x1 * jnp.uint32(a1) + (m1 >> 16) + (m2 >> 16), x * jnp.uint32(a)


def philox4x32(counter: tuple, key: tuple) -> tuple:
  """Philox4x32-10 (Salmon et al. 2011): four uint32 arrays (the counter words, broadcastable) and
  two uint32 key words → four uint32 arrays.  Random123's known answers: tests/test_kernel.py."""
  x0, x1, x2, x3 = (jnp.asarray(c, jnp.uint32) for c in counter)
  k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
  for _ in range(10):
    hi0, lo0 = _mulhilo(_PHILOX_M[0], x0)
    hi1, lo1 = _mulhilo(_PHILOX_M[1], x2)
    x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    k0, k1 = k0 + jnp.uint32(_PHILOX_W[0]), k1 + jnp.uint32(_PHILOX_W[1])
  return x0, x1, x2, x3


def normal_from_bits(bits: jax.Array) -> jax.Array:
  """Standard normals (float32) from uint32 bits: √2 · erf⁻¹(u) at the midpoint
  u = (k + ½)·2^-22 − 1 of k = bits >> 9 (2^23 points symmetric in (−1, 1), so |z| ≤ 5.3), by
  Giles' single-precision erf⁻¹ — XLA's own, written out so the kernel (candidates.cc) runs the
  same polynomial."""
  k = (bits >> 9).astype(jnp.int32).astype(jnp.float32)
  u = (k + 0.5) * (1.0 / 4194304.0) - 1.0
  w = -jnp.log((1.0 - u) * (1.0 + u))
  a, b = w - 2.5, jnp.sqrt(w) - 3.0
  p = jnp.full_like(u, 2.81022636e-08)
  q = jnp.full_like(u, -0.000200214257)
  for cp, cq in ((3.43273939e-07, 0.000100950558), (-3.5233877e-06, 0.00134934322),
                 (-4.39150654e-06, -0.00367342844), (0.00021858087, 0.00573950773),
                 (-0.00125372503, -0.0076224613), (-0.00417768164, 0.00943887047),
                 (0.246640727, 1.00167406), (1.50140941, 2.83297682)):
    p, q = cp + p * a, cq + q * b
  return jnp.float32(1.41421356237) * jnp.where(w < 5.0, p, q) * u


def philox_normals(key_data: jax.Array, candidates: jax.Array, d: int, n: int) -> jax.Array:
  """The inputs G_c [d, n] of the candidates `candidates` [k] under `key_data` [2] (uint32):
  [k, d, n] float32, element e = i·n + m of G_c from philox4x32((c, e // 4, 0, 0), key)[e % 4].
  The fused CPU kernel (loopicl/kernels candidate_scores / candidate_inputs) draws the same."""
  blocks = -(-(d * n) // 4)
  c = jnp.asarray(candidates, jnp.uint32)[:, None]
  j = jnp.arange(blocks, dtype=jnp.uint32)[None, :]
  zero = jnp.zeros((), jnp.uint32)
  words = philox4x32((c, j, zero, zero), (key_data[..., 0], key_data[..., 1]))
  bits = jnp.stack(jnp.broadcast_arrays(*words), axis=-1).reshape(c.shape[0], 4 * blocks)
  return normal_from_bits(bits[:, :d * n]).reshape(-1, d, n)
