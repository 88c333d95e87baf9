"""The evaluation report's baselines: their definitions and the tuning of their knobs.

Every baseline is scored on the same evaluation prompts as the model, and every tuned knob is
tuned at the trained T on a *separate* set of scan prompts (`evaluation.analyze`), so no baseline
is fitted to the prompts it is scored on (`tune` does all three searches):
  * `gd_error`: plain GD with the best constant step η* (`construction.best_constant_step`);
  * `pgd_error`: preconditioned GD with A = c*·Σ⁻¹, Σ = `tasks.covariance(task)`.  PGD with cΣ⁻¹
    on (X, X_query) is exactly plain GD with step c on the whitened prompts (Σ^{-1/2}X,
    Σ^{-1/2}X_query) — the same targets, the same iterates up to W ↦ WΣ^{1/2} — so c* is found by
    the very same precise search as η* (`best_preconditioner_scale`);
  * `least_squares_error` (minimum-norm, the point GD converges to) and `ridge_error` at the best λ
    (`best_ridge`: a zoomed log-grid search); both are constant in t.

Shapes: prompts as in `tasks.Batch` (X: [batch, d, n], Y: [batch, d_out, n], X_query: [batch, d, m],
targets: [batch, d_out, m]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.linear import construction, tasks


def tune(scan: tasks.Batch, task_config, *, steps: int) -> tuple[float, float, float]:
  """(η*, c*, λ*): every baseline knob, tuned at `steps` loops on the scan prompts `scan`."""
  prompts = (scan.X, scan.Y, scan.X_query, scan.targets)
  eta, _ = construction.best_constant_step(*prompts, steps=steps)
  c, _ = best_preconditioner_scale(*prompts, task_config, steps=steps)
  lam, _ = best_ridge(*prompts)
  return eta, c, lam


def sqrt_inverse_covariance(task_config) -> np.ndarray:
  """Σ^{-1/2}: [d, d] float64, from the task's own eigen-decomposition of Σ."""
  u, lam = tasks.covariance_basis(task_config), tasks.covariance_spectrum(task_config)
  return (u / np.sqrt(lam)) @ u.T


def best_preconditioner_scale(X, Y, X_query, targets, task_config, *, steps: int) -> tuple[float, float]:
  """c* minimizing the batch-mean query MSE of T-step GD with A = c·Σ⁻¹; returns (c*, error).

  Plain GD with step c on the whitened prompts (Σ^{-1/2}X, Σ^{-1/2}X_query) has the same
  predictions (module docstring), so `construction.best_constant_step` does the search.
  """
  w = jnp.asarray(sqrt_inverse_covariance(task_config), X.dtype)
  return construction.best_constant_step(w @ X, Y, w @ X_query, targets, steps=steps)


@jax.jit
def _ridge_errors(X, Y, X_query, targets, lambdas):
  """Batch-mean query MSE of ridge for every λ: [len(lambdas)] (non-finite → +inf).

  One eigendecomposition Σ̂ = U diag(s) Uᵀ per prompt serves every λ:
  Ŵ(λ) X_q = (Y Xᵀ/n) U diag(1/(s + λ)) Uᵀ X_q.
  """
  n = X.shape[-1]
  s, U = jnp.linalg.eigh(construction.empirical_covariance(X))
  bU = (Y @ jnp.swapaxes(X, -1, -2) / n) @ U                       # [batch, d_out, d]
  UtXq = jnp.swapaxes(U, -1, -2) @ X_query                          # [batch, d, m]

  def error(lam):
    err = jnp.mean(jnp.square((bU / (s[..., None, :] + lam)) @ UtXq - targets))
    return jnp.where(jnp.isfinite(err), err, jnp.inf)
  return jax.lax.map(error, lambdas)


def best_ridge(X, Y, X_query, targets, *, rel_tol: float = 1e-3,
               grid_points: int = 49) -> tuple[float, float]:
  """The λ > 0 minimizing the batch-mean ridge query MSE: (λ*, error) as Python floats.

  A log grid over [1e-10, 1e2]·tr(Σ̂)/d (mean over prompts) zoomed around its best point until
  the bracket's ratio is below 1 + rel_tol (`construction.zoom_minimize`).  Noise-free prompts
  with n ≥ d end at the lower edge (ridge → least squares), which is the right answer.
  """
  scale = float(jnp.mean(jnp.trace(construction.empirical_covariance(X), axis1=-2, axis2=-1))) / X.shape[-2]
  scale = scale if np.isfinite(scale) and scale > 0 else 1.0
  return construction.zoom_minimize(
      lambda grid: _ridge_errors(X, Y, X_query, targets, jnp.asarray(grid, X.dtype)),
      np.geomspace(1e-10 * scale, 1e2 * scale, grid_points),
      done=lambda lo, best, hi: hi / lo <= 1 + rel_tol,
      refine=lambda lo, hi: np.geomspace(lo, hi, 17))


def sample_sigma_hats(task_config, seed: int, count: int) -> np.ndarray:
  """Σ̂ = X Xᵀ/n of `count` prompts with x_i ~ N(0, Σ) (numpy float64, numpy's generator `seed`):
  [count, d, d].  For closed-form studies of preconditioned GD."""
  d, n = int(task_config.d), int(task_config.n_context)
  root = np.linalg.cholesky(tasks.covariance(task_config))
  X = root @ np.random.default_rng(seed).standard_normal((count, d, n))
  return X @ np.swapaxes(X, -1, -2) / n


def expected_pgd_error(A: jax.Array, sigma_hat: jax.Array, sigma: jax.Array, loops: int) -> jax.Array:
  """Each prompt's query error after `loops` steps of W ← W + (W* − W) Σ̂ A from W = 0, in
  expectation over W* ~ N(0, I/d) and x_q ~ N(0, Σ) (noise-free): (1/d)·tr(B Σ Bᵀ) with
  B = (I − Σ̂A)^loops, since W* − W_T = W* B.  A: [d, d], sigma_hat: [prompts, d, d] -> [prompts]."""
  d = A.shape[-1]
  M = jnp.eye(d, dtype=A.dtype) - sigma_hat @ A
  B = jax.lax.fori_loop(0, loops, lambda _, B: B @ M, jnp.broadcast_to(jnp.eye(d, dtype=A.dtype), M.shape))
  return jnp.einsum("bij,jk,bik->b", B, sigma, B) / d


def closed_form_study(d: int, n: int, kappa: float, loops: int, prompts: int, test_prompts: int):
  """The rotated-Σ setting of the closed-form studies of docs/history.md: (Σ [d, d] numpy, training Σ̂'s, test Σ̂'s, per_prompt)
  with per_prompt(A, Σ̂'s) = expected_pgd_error at `loops`.  Call with x64 enabled."""
  task = tasks.default_config()  # the experiments' task section (configs/default.py: the same Σ)
  task.d, task.n_context, task.condition_number, task.rotate = d, n, kappa, True
  sigma = tasks.covariance(task)
  train, test = (jnp.asarray(sample_sigma_hats(task, seed, count))
                 for seed, count in ((0, prompts), (5, test_prompts)))
  S = jnp.asarray(sigma)
  return sigma, train, test, lambda A, sh: expected_pgd_error(A, sh, S, loops)
