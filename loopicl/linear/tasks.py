"""In-context regression tasks as prompt matrices (docs/theory.md §1).

A prompt holds n context examples and m queries as columns:

    Z0 = [ x_1 … x_n   x_q1 … x_qm ]     (d rows)
         [ y_1 … y_n   0    …  0   ]     (d_out rows)

with x_i ~ N(0, Σ), y_i = W* x_i + ε_i, W* ~ N(0, weight_scale² / d) entrywise and
ε ~ N(0, noise_std²).  Σ = U diag(λ) Uᵀ has eigenvalues spaced geometrically from 1 down to
1 / condition_number and belongs to the *task distribution*: it is drawn once from
`covariance_seed`, the same for every prompt, so a trained model can adapt to it.

Task kinds:
  * `linear_regression`: m = n_queries random queries x_q ~ N(0, Σ);
  * `vector_generation`: the m = d queries are e_1 … e_d, so the read-out block W_t X_query is
    the weight matrix W_t itself (n_queries is ignored).

`sample(key, task_config, batch_size)` is a pure function of its key: call it inside `jit`
(the config is read at trace time) and derive keys from the step number for exact resume.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopicl import prng

TASK_KINDS = ("linear_regression", "vector_generation")


def default_config() -> ml_collections.ConfigDict:
  """The `task` section of an experiment config, with every knob."""
  c = ml_collections.ConfigDict()
  c.kind = "linear_regression"  # one of TASK_KINDS.
  c.d = 10                      # input dimension of x.
  c.d_out = 1                   # output dimension of y (rows of W*).
  c.n_context = 40              # n: in-context examples per prompt.
  c.n_queries = 1               # m: query columns (linear_regression only; d for vector_generation).
  c.condition_number = 1.0      # κ_Σ ≥ 1: eigenvalues of Σ spaced geometrically from 1 to 1/κ_Σ.
  c.rotate = False              # random eigenbasis U for Σ (False: axis-aligned, U = I).
  c.covariance_seed = 0         # seed of the one Σ shared by the whole task distribution.
  c.noise_std = 0.0             # σ of the label noise ε.
  c.weight_scale = 1.0          # W* entries ~ N(0, weight_scale² / d).
  return c


def _fail(field: str, value, allowed: str):
  raise ValueError(f"task.{field}={value!r} is invalid; allowed: {allowed}")


def validate(task_config) -> None:
  """Raises ValueError naming the field and the allowed values for a bad task config."""
  c = task_config
  if c.kind not in TASK_KINDS:
    _fail("kind", c.kind, " | ".join(TASK_KINDS))
  for field in ("d", "d_out", "n_context", "n_queries"):
    v = c[field]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      _fail(field, v, "an integer >= 1")
  if not np.isfinite(c.condition_number) or c.condition_number < 1:
    _fail("condition_number", c.condition_number, "a finite number >= 1")
  if not np.isfinite(c.noise_std) or c.noise_std < 0:
    _fail("noise_std", c.noise_std, "a finite number >= 0")
  if not np.isfinite(c.weight_scale) or c.weight_scale <= 0:
    _fail("weight_scale", c.weight_scale, "a finite number > 0")
  if not isinstance(c.rotate, (bool, np.bool_)):
    _fail("rotate", c.rotate, "True | False")


def num_queries(task_config) -> int:
  """m, the number of query columns of a prompt."""
  if task_config.kind == "vector_generation":
    return int(task_config.d)
  return int(task_config.n_queries)


def covariance_spectrum(task_config) -> np.ndarray:
  """λ: [d] eigenvalues of Σ, geometric from 1 down to 1 / condition_number (float64)."""
  d = int(task_config.d)
  if d == 1:
    return np.ones(1)
  return np.geomspace(1.0, 1.0 / float(task_config.condition_number), d)


def covariance_basis(task_config) -> np.ndarray:
  """U: [d, d] eigenbasis of Σ; a Haar-random rotation from `covariance_seed` if `rotate`."""
  d = int(task_config.d)
  if not task_config.rotate:
    return np.eye(d)
  rng = np.random.default_rng(int(task_config.covariance_seed))
  q, r = np.linalg.qr(rng.standard_normal((d, d)))
  return q * np.sign(np.diag(r))  # sign fix makes the distribution Haar.


def covariance(task_config) -> np.ndarray:
  """Σ = U diag(λ) Uᵀ: [d, d] float64."""
  u, lam = covariance_basis(task_config), covariance_spectrum(task_config)
  return (u * lam) @ u.T


class Batch(NamedTuple):
  """A batch of prompts and everything evaluation needs.

  Z0:       [batch, d + d_out, n + m]  the prompt matrices (query labels are zero).
  X:        [batch, d, n]              context inputs.
  Y:        [batch, d_out, n]          context targets (noisy).
  X_query:  [batch, d, m]              query inputs.
  targets:  [batch, d_out, m]          noiseless query targets W* X_query (the Bayes predictor's
                                       output; label noise would only add σ² to every MSE).
  W_star:   [batch, d_out, d]          the task's weights.
  weight:   [batch] or None            training batches: each prompt's weight in the loss (sums to
                                       1; loopicl/linear/tail_sampling.py); None: uniform.
  """
  Z0: jax.Array
  X: jax.Array
  Y: jax.Array
  X_query: jax.Array
  targets: jax.Array
  W_star: jax.Array
  weight: jax.Array | None = None


def sample(key: jax.Array, task_config, batch_size: int) -> Batch:
  """Draws `batch_size` independent prompts from the task distribution. Pure and jit-able."""
  validate(task_config)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
  k_w, k_x, k_q, k_eps = jax.random.split(key, 4)
  return complete((k_w, k_q, k_eps),
                  task_config, sample_inputs(k_x, task_config, batch_size))


def sqrt_sigma(c, dtype):
  """Σ^{1/2} = U diag(√λ) [d, d]: x = Σ^{1/2} g with g ~ N(0, I)."""
  # Σ^{1/2} = U diag(√λ) is a trace-time constant: the same Σ for every prompt.
  return jnp.asarray(covariance_basis(c) * np.sqrt(covariance_spectrum(c)), dtype)


def sample_inputs(key: jax.Array, task_config, batch_size: int) -> jax.Array:
  """The context inputs of `batch_size` prompts, x_i ~ N(0, Σ): X [batch, d, n]."""
  c = task_config
  dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64.
  return sqrt_sigma(c, dtype) @ prng.normal(key, (batch_size, int(c.d), int(c.n_context)), dtype)


def complete(keys, task_config, X: jax.Array) -> Batch:
  """The prompts whose context inputs are X [batch, d, n]: draws W*, the queries and the noise
  from keys = (k_w, k_q, k_eps)."""
  c = task_config
  k_w, k_q, k_eps = keys
  batch_size, d, n = X.shape
  d_out, m = int(c.d_out), num_queries(c)
  dtype = X.dtype
  W_star = (c.weight_scale / np.sqrt(d)) * prng.normal(k_w, (batch_size, d_out, d), dtype)
  if c.kind == "vector_generation":
    X_query = jnp.broadcast_to(jnp.eye(d, dtype=dtype), (batch_size, d, d))
  else:
    X_query = sqrt_sigma(c, dtype) @ prng.normal(k_q, (batch_size, d, m), dtype)
  noise = c.noise_std * prng.normal(k_eps, (batch_size, d_out, n), dtype)
  Y = W_star @ X + noise
  targets = W_star @ X_query
  Z0 = jnp.concatenate(
      [jnp.concatenate([X, X_query], axis=-1),
       jnp.concatenate([Y, jnp.zeros((batch_size, d_out, m), dtype)], axis=-1)],
      axis=-2)
  return Batch(Z0=Z0, X=X, Y=Y, X_query=X_query, targets=targets, W_star=W_star)


def query_mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean squared error per prompt: predictions, targets [..., batch, d_out, m] -> [..., batch]."""
  return jnp.mean(jnp.square(predictions - targets), axis=(-2, -1))


def relative_weight_error(W_hat: jax.Array, W_star: jax.Array) -> jax.Array:
  """||Ŵ − W*||_F / ||W*||_F per prompt: [..., batch, d_out, d] -> [..., batch]."""
  num = jnp.sqrt(jnp.sum(jnp.square(W_hat - W_star), axis=(-2, -1)))
  return num / jnp.sqrt(jnp.sum(jnp.square(W_star), axis=(-2, -1)))
