"""Each prompt's expected error over the query: the statistic for "the typical prompt" (docs/reproduction.md, "Which statistic each column is").

The grid and the reports first scored a method on a prompt by the squared error of *one* random
query.  Its mean over prompts is an unbiased estimate of the mean over prompts of the prompt's
expected error, but its median and quantiles are not those of the expected error: they mix the
spread over prompts with the spread over the query (a χ²₁-like factor per prompt; at d = 10,
n = 40, T = 5 the single-query median is ~0.4× the median expected error).  For a method that
is linear in the query — GD under any step rule, PGD, the ladder, least squares, ridge, and the
looped linear transformer (its query columns never enter the keys, so ŷ = W_eff x_q) — the
expected error has a closed form in the method's effective weights W_eff [d_out, d]:

    E_q(prompt) = (1/d_out) Σ_o (w_o − w*_o)ᵀ Σ_q (w_o − w*_o) + σ²,

the mean over outputs, as `tasks.query_mse` averages them (the sum over outputs is d_out× this),
with Σ_q the queries' second moment and σ the label noise of the query's target.  The grid and
the reports measure against the *noise-free* targets W* x_q (`tasks.Batch.targets`), so they
call it with noise_std = 0 and E_q is then exactly the expectation of their single-query error.

  * `expected_error(W_eff, W_star, sigma, noise_std)`: the formula (numpy or jax arrays; float64
    under x64), [..., batch];
  * `query_covariance(task)`: Σ_q — Σ for linear regression; I/d for vector generation, whose
    queries are e_1 … e_d, so E_q is its query MSE itself (nothing random in the query);
  * `effective_weights(readout_fn, batch)`: W_eff of a method given only as a read-out function,
    read at the d unit queries e_1 … e_d (`unit_query_batch`);
  * `query_decomposition`, `spectral_expected_errors`: constant-step GD's (and c·Σ⁻¹-PGD's) E_q
    after any T in closed form in each prompt's eigenbasis (`linear.spectral`), as the grid and
    the learning table score their step rules;
  * `statistics(single, expected, threshold)`: the per-prompt errors' distribution over prompts
    under the grid's column names (single-query and expected side by side).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import stats
from loopicl.linear import spectral, tasks


def expected_error(W_eff, W_star, sigma, noise_std=0.0):
  """E_q per prompt: W_eff, W_star [..., batch, d_out, d]; sigma: Σ_q [d, d] (or batched); -> [..., batch].

  The mean over the d_out outputs of (w − w*)ᵀ Σ_q (w − w*), plus noise_std² (the label noise of
  the query's target; 0 for an error against noise-free targets).  jax arrays in, jax out (jit-able);
  numpy in, numpy out (float64).
  """
  xp = jnp if any(isinstance(a, jax.Array) for a in (W_eff, W_star, sigma)) else np
  D = xp.asarray(W_eff) - xp.asarray(W_star)
  S = xp.asarray(sigma, dtype=D.dtype)
  quad = xp.sum((D @ S) * D, axis=(-2, -1)) / D.shape[-2]
  return quad + float(noise_std) ** 2


def query_covariance(task) -> np.ndarray:
  """Σ_q [d, d] float64: the covariance Σ of the task's queries (linear regression), or I/d for
  vector generation (its queries are e_1 … e_d, each a 1/d share of the query MSE)."""
  if task.kind == "vector_generation":
    return np.eye(int(task.d)) / int(task.d)
  return tasks.covariance(task)


def unit_query_batch(batch: tasks.Batch) -> tasks.Batch:
  """The same prompts with their m queries replaced by the d unit queries e_1 … e_d (label rows 0):
  Z0 [batch, D, n + d], X_query = I, targets = W* (what the unit queries' targets are)."""
  X = batch.X
  d, n = X.shape[-2], X.shape[-1]
  D = batch.Z0.shape[-2]
  probes = jnp.zeros((D, d), X.dtype).at[:d].set(jnp.eye(d, dtype=X.dtype))
  lead = batch.Z0.shape[:-2]
  Z0 = jnp.concatenate([batch.Z0[..., :n], jnp.broadcast_to(probes, lead + (D, d))], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(d, dtype=X.dtype), lead + (d, d))
  return batch._replace(Z0=Z0, X_query=eye, targets=batch.W_star)


def effective_weights(readout_fn, batch: tasks.Batch):
  """W_eff of a query-linear method: readout_fn(unit) [..., batch, d_out, d] at the unit queries.

  readout_fn(unit) gets `unit_query_batch(batch)` — the same context, the d unit queries as its
  query columns (so its n_queries is d = unit.X_query.shape[-1], whatever the batch's m was) —
  and returns the read-outs [..., batch, d_out, d] (any leading axes, e.g. one per loop).  For a
  method with ŷ = W_eff x_q, column j of the read-out is W_eff e_j: the read-out *is* W_eff.
  The looped linear transformer qualifies: a query column only ever influences itself and moves
  linearly given the context, z_q ← (I + P·Z M Zᵀ·Q/n) z_q, from z_q = (x_q, 0).
  """
  return readout_fn(unit_query_batch(batch))


def _sqrt(sigma) -> np.ndarray:
  """R with R Rᵀ = Σ (U diag(√λ)); float64."""
  lam, U = np.linalg.eigh(np.asarray(sigma, np.float64))
  return U * np.sqrt(np.maximum(lam, 0.0))


def query_decomposition(batch: tasks.Batch, sigma, whitening=None) -> spectral.Spectral:
  """The prompts' `spectral.Spectral` for E_q: read out at the d columns of R = Σ^{1/2}
  (R Rᵀ = Σ, so Σ_j ||(W − W*) r_j||² = tr((W − W*) Σ (W − W*)ᵀ)), against W* R.
  whitening: Σ^{-1/2} for PGD with A = c·Σ⁻¹ (`spectral.decompose`).  Call under x64."""
  X = batch.X
  R = jnp.broadcast_to(jnp.asarray(_sqrt(sigma), X.dtype), X.shape[:-2] + (X.shape[-2],) * 2)
  return spectral.decompose(X, batch.Y, R, batch.W_star @ R, kind="mse", whitening=whitening)


@functools.partial(jax.jit, static_argnames="max_loops")
def spectral_expected_errors(sp: spectral.Spectral, step, loops,
                             max_loops: int = spectral.MAX_LOOPS) -> jax.Array:
  """E_q (noise-free) after T steps of constant-step GD, for T in loops: [len(loops), batch].

  sp: `query_decomposition`'s; step: a scalar, [batch] (one per prompt) or [L, 1] (one per T),
  as `spectral.errors` takes it.  W_T R = α diag(g_T(λ)) β with β = Vᵀ R: a batched product
  [L, batch, d_out, d] @ [batch, d, d], never an [L, batch, d_out, d, d] tensor.
  """
  gain = spectral.gain(sp.eigenvalues, step, loops, max_loops)        # [L, batch, d]
  read = (sp.coefficients * gain[..., None, :]) @ sp.readout           # [L, batch, d_out, d]
  return jnp.sum(jnp.square(read - sp.targets), axis=(-2, -1)) / sp.targets.shape[-2]


SINGLE_QUERY = {"error": "error", "error_median": "single_query_error_median",
                "error_q90": "single_query_error_q90", "error_q99": "single_query_error_q99",
                "frac_below_eps": "single_query_frac_below_eps", "nonfinite": "nonfinite"}
EXPECTED = {"error": "expected_error", "error_median": "expected_error_median",
            "error_q90": "expected_error_q90", "error_q99": "expected_error_q99",
            "frac_below_eps": "frac_expected_below_eps"}
RECORD_KEYS = tuple(SINGLE_QUERY.values()) + tuple(EXPECTED.values())


def statistics(single, expected, threshold: float) -> dict[str, np.ndarray]:
  """`stats.prompt_distribution` of the single-query errors and of the expected errors
  [..., batch], under the grid's names (`RECORD_KEYS`): `error` (the mean of the single-query
  error: an unbiased estimate of the mean E_q), `single_query_error_median` / `_q90` / `_q99`,
  `single_query_frac_below_eps`, `nonfinite`, and `expected_error` (mean E_q),
  `expected_error_median` / `_q90` / `_q99`, `frac_expected_below_eps`; each [...]."""
  s = stats.prompt_distribution(np.asarray(single), threshold)
  e = stats.prompt_distribution(np.asarray(expected), threshold)
  return {**{new: s[old] for old, new in SINGLE_QUERY.items()},
          **{new: e[old] for old, new in EXPECTED.items()}}
