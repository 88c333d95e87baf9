"""Training batches that always hold the extreme prompts, weighted to their true share.

Why: the mean error of a looped model over prompts is decided by a few prompts with a large
λ_max(Σ̂) (docs/learning.md): at n/d = 1.5 and T = 20, 1–6 prompts of 2048 carry 90% of it.  A
uniform batch of 128 meets such a prompt in a few percent of the steps, as a gradient spike that
clipping and Adam's normalisation cut down to one ordinary step; the model then learns a step
that is too large for them and blows them up.  Here each batch is drawn from a pool of
`pool · batch` candidate prompts: the `tail` candidates with the largest whitened λ_max are always
in it, each weighted 1/|pool|, and the other batch − tail prompts are a uniform draw (without
replacement) from the rest, each weighted (|pool| − tail) / (|pool| · (batch − tail)).  The
weighted loss Σ_b w_b ℓ_b is an unbiased estimate of the pool's mean loss, hence of the
population mean: the objective is unchanged, only its estimate sees the tail in every step.

The score is λ_max of the whitened sample covariance (1/n)·G Gᵀ, G = Σ^{-1/2} X: it depends on the
prompt only (not on the model) and is the Marchenko–Pastur edge for κ_Σ = 1.

The candidates: candidate c of a step is G_c = prng.philox_normals(pool key, c) — Philox4x32-10
normals that are a pure function of (key, c, element) — so a candidate can be scored without
the pool being stored, and the chosen ones drawn again for the batch.  On the CPU with the fused
kernel (`model.kernel` resolved to "cpu") loopicl/kernels does both (`candidate_scores`: each
candidate drawn and scored in the SIMD lanes; `candidate_inputs`: the chosen ones), ~2-3× faster
than XLA's threefry draw of the same count plus the score (`python
scripts/benchmark_tail_sampling.py`).  Elsewhere XLA draws the same candidates with jnp and
scores them with batched dots: the same normals but for the last bit (log and FMA rounding),
the same batch but for near-ties at the tail's edge.  The candidates are float32 normals.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import prng
from loopicl.linear import baselines, tasks


POWER_ITERATIONS = 16


def whitened_lambda_max(X: jax.Array, task_config) -> jax.Array:
  """λ_max((1/n) Σ^{-1/2} X Xᵀ Σ^{-1/2}) per prompt by power iteration: X [batch, d, n] -> [batch].

  Power iteration, not eigvalsh: batched eigvalsh of 1024 small matrices costs ~12 ms a step on a
  CPU, 15x the whole uniform batch; the Rayleigh quotient after 16 power iterations ranks the
  pool as well (it can only under-estimate λ_max, by ~(λ₂/λ₁)^32 relative).
  """
  inv_sqrt = jnp.asarray(baselines.sqrt_inverse_covariance(task_config), X.dtype)  # trace-time
  return gram_lambda_max(inv_sqrt @ X)


def gram_lambda_max(G: jax.Array) -> jax.Array:
  """λ_max((1/n) G Gᵀ) per prompt, G [batch, d, n] -> [batch]: the score on the XLA path (the
  fused kernel's `kernels.candidate_scores` computes the same on the CPU)."""
  return _power_lambda_max(G @ jnp.swapaxes(G, -1, -2) / G.shape[-1])


DEEP_LOOPS = 20       # from this T on, with n < FEW_EXAMPLES·d, the pool is LARGE_POOL
FEW_EXAMPLES = 3
POOL, LARGE_POOL = 8, 64


def auto_pool(loops: int, d: int, n_context: int) -> int:
  """The candidate pool of `linear.tail_pool = "auto"`: 64 per batch prompt where the loops are
  deep (T ≥ 20) on few examples (n < 3d), 8 elsewhere.

  Why: there the prompts that decide the mean error are ~0.1% of the population (the few whose
  whitened λ_max(Σ̂) puts them near the loop's stability edge); with 8 candidates the mean over
  65 536 fresh prompts ended 1.7–12× GD's on 3 of 4 seeds at n/d = 1.5 and 1.9–3.2× on 2 of 4 at
  n/d = 2, with 64 at 0.62–0.69× and 0.15–0.17× (docs/history.md).  64 costs ~2–4× a step, so
  only there.  Measured at T ≤ 20 and n/d ∈ {1.5, 2} (64) and n/d ≥ 4 (8); n/d in (2, 3) at
  T = 20, and T > 20, are this rule's extrapolation.
  """
  deep = int(loops) >= DEEP_LOOPS and int(n_context) < FEW_EXAMPLES * int(d)
  return LARGE_POOL if deep else POOL


def resolve_pool(tail_pool, loops: int, d: int, n_context: int) -> int:
  """`linear.tail_pool` as a number: "auto" → `auto_pool`; a count ("64") → 64."""
  if tail_pool == "auto":
    return auto_pool(loops, d, n_context)
  return int(tail_pool)


def weights(batch_size: int, pool: int, tail: int) -> np.ndarray:
  """Per-prompt weights [batch]: the tail first, then the uniform draws; they sum to 1."""
  size = pool * batch_size
  rest = (size - tail) / (size * (batch_size - tail))
  return np.concatenate([np.full(tail, 1.0 / size), np.full(batch_size - tail, rest)])


def _power_lambda_max(S: jax.Array) -> jax.Array:
  """λ_max of symmetric PSD S [batch, d, d] by power iteration (see whitened_lambda_max)."""
  # Start at S's column of largest norm: with S e_j = Σ_i λ_i u_ij u_i its component on the top
  # eigenvector is λ₁·u_1j, not small for that j (S·1 was nearly orthogonal to it for some prompts).
  j = jnp.argmax(jnp.sum(S * S, axis=-2), axis=-1)
  v = jnp.take_along_axis(S, j[:, None, None], axis=-1)[..., 0]
  for _ in range(POWER_ITERATIONS):
    v = jnp.einsum("bij,bj->bi", S, v)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  return jnp.einsum("bi,bij,bj->b", v, S, v)


def sample(key: jax.Array, task_config, batch_size: int, pool: int, tail: int,
           kernel: bool = False) -> tasks.Batch:
  """A batch of `batch_size` prompts with `weight` [batch] (see the module docstring).

  pool = 1 or tail = 0 is the plain uniform batch (weight None: the loss takes the mean).
  `kernel`: score the candidates with the fused CPU kernel (float32 on a CPU device; the same
  candidates and, up to rounding, the same scores as XLA's).  Pure and jit-able.
  """
  if pool == 1 or tail == 0:
    return tasks.sample(key, task_config, batch_size)
  k_pool, k_w, k_q, k_eps = jax.random.split(key, 4)
  d, n, size = int(task_config.d), int(task_config.n_context), pool * batch_size
  dtype = jnp.result_type(float)
  # Candidate c's whitened inputs G_c [d, n] (X = Σ^{1/2} G: tasks.sample_inputs' distribution) are
  # a pure function of (pool key, c) (prng.philox_normals), so the score needs no Σ^{-1/2} and the
  # kernel never stores the pool: it scores each candidate as it draws it, then draws the chosen again.
  pool_key = jax.random.key_data(k_pool)
  if kernel:
    from loopicl import kernels
    score = kernels.candidate_scores(pool_key, size, d, n, POWER_ITERATIONS)
  else:
    candidates = prng.philox_normals(pool_key, jnp.arange(size), d, n)
    score = gram_lambda_max(candidates)
  _, top = jax.lax.top_k(score, tail)
  in_tail = jnp.zeros(size, bool).at[top].set(True)
  # The first batch − tail of the others, in draw order, are a uniform draw from the others: the
  # candidates are exchangeable, so which indices the top `tail` took says nothing about the rest.
  rest = jnp.nonzero(~in_tail, size=batch_size - tail)[0]
  chosen = jnp.concatenate([top, rest]).astype(jnp.int32)
  G = kernels.candidate_inputs(pool_key, chosen, d, n) if kernel else candidates[chosen]
  X = tasks.sqrt_sigma(task_config, dtype) @ G.astype(dtype)
  batch = tasks.complete((k_w, k_q, k_eps), task_config, X)
  return batch._replace(weight=jnp.asarray(weights(batch_size, pool, tail), batch.X.dtype))
