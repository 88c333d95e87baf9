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

The candidates are drawn without their inputs (n ≥ d): a Gaussian G [d, n] is L·U with L the
lower-triangular Cholesky factor of G Gᵀ and U [d, n] with orthonormal rows, L and U independent,
L of Bartlett's law (L_ii² ~ χ²(n − i), i = 0 … d − 1, L_ij ~ N(0, 1) below the diagonal) and U
uniform (Haar) on the Stiefel manifold.  The score needs only G Gᵀ = L Lᵀ, so each candidate
costs d(d+1)/2 draws instead of d·n, and only the batch_size chosen ones get a U (the Q of a
Gaussian's QR): the batch has exactly the law of direct draws, and the draw costs about half
(BARTLETT_MIN_RATIO; the candidates' Gram matrices were 2/3 of a step at d = 10, n = 80, T = 20).
Below n = 4d the candidates' inputs are drawn directly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.linear import baselines, tasks


POWER_ITERATIONS = 16
# Candidates are drawn through Bartlett's factor from n ≥ BARTLETT_MIN_RATIO·d on: there it is the
# cheaper draw (4 seeds vmapped, 1024 candidates on a 2-core CPU: d = 10, n = 80: 34 ms against
# 65 ms a step; d = 20, n = 80: 58 against 134), below it the d·n inputs cost less than the
# χ² and QR draws (d = 10, n = 15: 39 against 15 ms).
BARTLETT_MIN_RATIO = 4


def whitened_lambda_max(X: jax.Array, task_config) -> jax.Array:
  """λ_max((1/n) Σ^{-1/2} X Xᵀ Σ^{-1/2}) per prompt by power iteration: X [batch, d, n] -> [batch].

  Power iteration, not eigvalsh: batched eigvalsh of 1024 small matrices costs ~12 ms a step on a
  CPU, 15x the whole uniform batch; the Rayleigh quotient after 16 power iterations ranks the
  pool as well (it can only under-estimate λ_max, by ~(λ₂/λ₁)^32 relative).
  """
  inv_sqrt = jnp.asarray(baselines.sqrt_inverse_covariance(task_config), X.dtype)  # trace-time
  G = inv_sqrt @ X
  S = G @ jnp.swapaxes(G, -1, -2) / X.shape[-1]                       # [batch, d, d]
  return _power_lambda_max(S)


def weights(batch_size: int, pool: int, tail: int) -> np.ndarray:
  """Per-prompt weights [batch]: the tail first, then the uniform draws; they sum to 1."""
  size = pool * batch_size
  rest = (size - tail) / (size * (batch_size - tail))
  return np.concatenate([np.full(tail, 1.0 / size), np.full(batch_size - tail, rest)])


def bartlett_factor(key: jax.Array, count: int, d: int, n: int, dtype) -> jax.Array:
  """L [count, d, d], lower triangular, with L Lᵀ ~ Wishart_d(n, I) (Bartlett's decomposition:
  L_ii = √χ²(n − i), L_ij ~ N(0, 1) for i > j, all independent).  Needs n ≥ d."""
  k_z, k_c = jax.random.split(key)
  Z = jax.random.normal(k_z, (count, d, d), dtype)
  # Drawn [d, count] and transposed: the gamma sampler runs 2x faster with the long axis last.
  chi2 = jax.random.chisquare(k_c, jnp.asarray(n - np.arange(d), dtype)[:, None], (d, count), dtype).T
  return jnp.tril(Z, -1) + jnp.sqrt(chi2)[..., None] * jnp.eye(d, dtype=dtype)


def haar_rows(key: jax.Array, count: int, d: int, n: int, dtype) -> jax.Array:
  """U [count, d, n] with orthonormal rows, uniform on the Stiefel manifold: the Qᵀ of the QR of
  a Gaussian H [n, d] with R's diagonal made positive (then Q is Haar and independent of R)."""
  H = jax.random.normal(key, (count, n, d), dtype)
  q, r = jnp.linalg.qr(H)
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
  return jnp.swapaxes(q, -1, -2)


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


def sample(key: jax.Array, task_config, batch_size: int, pool: int, tail: int) -> tasks.Batch:
  """A batch of `batch_size` prompts with `weight` [batch] (see the module docstring).

  pool = 1 or tail = 0 is the plain uniform batch (weight None: the loss takes the mean).  Pure
  and jit-able.
  """
  if pool == 1 or tail == 0:
    return tasks.sample(key, task_config, batch_size)
  k_pool, k_w, k_q, k_eps = jax.random.split(key, 4)
  d, n, size = int(task_config.d), int(task_config.n_context), pool * batch_size
  dtype = jnp.result_type(float)
  bartlett = n >= BARTLETT_MIN_RATIO * d
  if bartlett:
    k_l, k_u = jax.random.split(k_pool)
    L = bartlett_factor(k_l, size, d, n, dtype)                     # the candidates' G Gᵀ = L Lᵀ
    score = _power_lambda_max(L @ jnp.swapaxes(L, -1, -2) / n)
  else:
    X_pool = tasks.sample_inputs(k_pool, task_config, size)
    score = whitened_lambda_max(X_pool, task_config)
  _, top = jax.lax.top_k(score, tail)
  in_tail = jnp.zeros(size, bool).at[top].set(True)
  # The first batch − tail of the others, in draw order, are a uniform draw from the others: the
  # candidates are exchangeable, so which indices the top `tail` took says nothing about the rest.
  rest = jnp.nonzero(~in_tail, size=batch_size - tail)[0]
  chosen = jnp.concatenate([top, rest])
  if bartlett:
    G = L[chosen] @ haar_rows(k_u, batch_size, d, n, dtype)         # exactly N(0, I) [batch, d, n]
    X = tasks.sqrt_sigma(task_config, dtype) @ G
  else:
    X = X_pool[chosen]
  batch = tasks.complete((k_w, k_q, k_eps), task_config, X)
  return batch._replace(weight=jnp.asarray(weights(batch_size, pool, tail), batch.X.dtype))
