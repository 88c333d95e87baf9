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
    (`best_ridge`: a zoomed log-grid search); both are constant in t;
  * the knobs of the ladder's GD++ rungs (`ladder`, `construction.gdpp_params`): (γ, η) for the
    batch mean by a joint 2-D search (`fit_gdpp`), and each prompt's own (`gdpp_oracle`).

Shapes: prompts as in `tasks.Batch` (X: [batch, d, n], Y: [batch, d_out, n], X_query: [batch, d, m],
targets: [batch, d_out, m]).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.linear import construction, model as model_lib, tasks


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


# ---- GD++ (`construction.gdpp_params`): its two knobs, tuned for the mean and per prompt ----

@functools.partial(jax.jit, static_argnames="steps")
def _gdpp_errors(lam, alpha, beta, targets, gammas, etas, *, steps: int) -> jax.Array:
  """Batch-mean query MSE of GD++ after `steps` loops for each pair (gammas[i], etas[i]), from
  `construction.spectral_basis`'s (λ, bV, VᵀX_q); non-finite (a diverging prompt): +inf."""
  def error(pair):
    g = construction.gdpp_filters(lam, steps=steps, step_size=pair[1], gamma=pair[0])[0][-1]
    err = jnp.mean(jnp.square((alpha * g[..., None, :]) @ beta - targets))
    return jnp.where(jnp.isfinite(err), err, jnp.inf)
  return jax.lax.map(error, jnp.stack([gammas, etas], axis=-1), batch_size=9)


def fit_gdpp(X, Y, X_query, targets, *, steps: int, rel_tol: float = 1e-3,
             max_rounds: int = 40) -> tuple[float, float, float]:
  """(γ, η, error): GD++'s knobs minimising the batch-mean query MSE after `steps` loops.

  A joint 2-D search (one knob at a time misses the optimum: it lies far from GD's η, where the
  first loops overshoot and the shrinking spectrum brings them back): a 25 × 49 grid, γ linear
  over [0, 2/median λ_max(Σ̂)] (γ = 0 is GD), η log over [1e-2, 16]/min λ_max(Σ̂), then 9 × 9
  grids across the best point's neighbours until both brackets are narrower than rel_tol (γ's
  relative to the grid's end, η's to η).  Errors come from the closed form
  (`construction.gdpp_filters`) in the prompts' dtype, non-finite → +inf, so a diverging prompt
  never wins.  The best point of every round and GD's own search (`construction.best_constant_step`,
  γ = 0) compete: the fit is never worse than the tuned GD on these prompts.
  """
  model_lib._check_positive_int("steps", steps)
  model_lib._check_positive_int("max_rounds", max_rounds)
  if not 0 < rel_tol < 1:
    raise ValueError(f"rel_tol={rel_tol!r} is invalid; allowed: a number in (0, 1)")
  lam, _, alpha, beta = construction.spectral_basis(X, Y, X_query)
  lam_max = np.asarray(lam[..., -1])
  gammas = np.linspace(0.0, 2.0, 25) / np.median(lam_max)
  etas = np.geomspace(1e-2, 16.0, 49) / lam_max.min()
  gamma_end = gammas[-1]
  eta_gd, err_gd = construction.best_constant_step(X, Y, X_query, targets, steps=steps)
  best = (0.0, eta_gd, err_gd)                           # GD: the search starts from it
  for _ in range(max_rounds):
    G, E = (a.ravel() for a in np.meshgrid(gammas, etas, indexing="ij"))
    pad = -len(G) % 81                                   # chunks of 81 pairs: one compiled shape
    G, E = (jnp.asarray(np.r_[a, np.full(pad, a[-1])], X.dtype).reshape(-1, 81) for a in (G, E))
    err = np.concatenate([np.asarray(_gdpp_errors(lam, alpha, beta, targets, g, e, steps=steps))
                          for g, e in zip(G, E)])
    i, j = np.unravel_index(np.argmin(err), (len(gammas), len(etas)))
    here = (float(gammas[i]), float(etas[j]), float(err[i * len(etas) + j]))
    best = min(best, here, key=lambda b: b[2])           # a zoomed grid need not hold the last best
    g_lo, g_hi = gammas[max(i - 1, 0)], gammas[min(i + 1, len(gammas) - 1)]
    e_lo, e_hi = etas[max(j - 1, 0)], etas[min(j + 1, len(etas) - 1)]
    if not np.isfinite(here[2]) or (g_hi - g_lo <= rel_tol * gamma_end
                                    and e_hi - e_lo <= rel_tol * here[1]):
      break
    gammas, etas = np.linspace(g_lo, g_hi, 9), np.linspace(e_lo, e_hi, 9)
  return best


# The per-prompt oracle's first grid, in the scale-free knobs (γ·λ_max, η·λ_max) of each prompt.
_ORACLE_GRID, _ORACLE_BANDS = (np.linspace(0.0, 1.5, 31), np.geomspace(0.25, 32.0, 43)), 3


def gdpp_oracle(X: jax.Array, *, steps: int, rounds: int = 6) -> tuple[jax.Array, jax.Array]:
  """Each prompt's own GD++ knobs (γ_i, η_i), [batch] each: those minimising its T-loop
  contraction max_j |e_T(λ_j)| over the non-zero eigenvalues λ_j of its Σ̂ (`construction.
  gdpp_filters`; ||W_T − W_LS||_F ≤ max_j |e_T(λ_j)|·||W_LS||_F).  The analogue of GD's per-prompt
  η_i = 2/(λ_max + λ_min), which minimises max_j |1 − ηλ_j|^T; like it, label-free (Σ̂ only).

  e_T depends on (γλ, ηλ) only, so each prompt is searched in (γ·λ_max, η·λ_max): a 31 × 43 grid
  ([0, 1.5] linear × [0.25, 32] log); its best point in each third of the γ range (the landscape
  has several basins, e.g. near γλ_max ≈ 0.6 and ≈ 1.3) starts `rounds` 9 × 9 grids across the
  best point's neighbours, each 4× finer; the best start wins.  Non-finite → +inf.  Jit-able.
  """
  model_lib._check_positive_int("steps", steps)
  model_lib._check_positive_int("rounds", rounds)
  return _gdpp_oracle(X, steps=steps, rounds=rounds)


@functools.partial(jax.jit, static_argnames=("steps", "rounds"))
def _gdpp_oracle(X, *, steps: int, rounds: int):
  lam = jnp.maximum(jnp.linalg.eigvalsh(construction.empirical_covariance(X)), 0.0)
  top = lam[..., -1]
  nu = lam / top[..., None]
  live = nu > 1e-10                                                # Σ̂'s null space never moves

  def worst(u, w):                                                 # [grid, starts, batch] -> same
    def one(uw):
      e = construction.gdpp_filters(nu, steps=steps, step_size=uw[1], gamma=uw[0])[1][-1]
      v = jnp.max(jnp.where(live, jnp.abs(e), 0.0), axis=-1)
      return jnp.where(jnp.isfinite(v), v, jnp.inf)
    return jax.lax.map(one, (u, w), batch_size=9 if u.shape[0] % 9 == 0 else 1)

  def pick(u, w):                                                  # the best of each start's grid
    v = worst(u, w)
    k = jnp.argmin(v, axis=0)[None]
    return tuple(jnp.take_along_axis(a, k, 0)[0] for a in (u, w, v))

  # Starts: the first grid's best point in each band of γ·λ_max (the landscape has several basins).
  grid_u, grid_w = _ORACLE_GRID
  u0, w0 = (jnp.asarray(a, X.dtype) for a in np.meshgrid(grid_u, grid_w, indexing="ij"))
  v0 = worst(u0.reshape(len(grid_u), 1, -1, 1), w0.reshape(len(grid_u), 1, -1, 1))   # [u, 1, w, batch]
  bands = np.array_split(np.arange(len(grid_u)), _ORACLE_BANDS)
  u, w = [], []
  for band in bands:
    v = v0[band[0]:band[-1] + 1, 0].reshape(-1, *top.shape)
    k = jnp.argmin(v, axis=0)
    u.append(u0[band[0]:band[-1] + 1].reshape(-1)[k])
    w.append(w0[band[0]:band[-1] + 1].reshape(-1)[k])
  u, w = jnp.stack(u), jnp.stack(w)                                # [starts, batch]
  du = jnp.full_like(u, grid_u[1])
  dw = w * (grid_w[1] / grid_w[0] - 1)
  ou, ow = (jnp.asarray(a.reshape(-1, 1, 1), X.dtype)
            for a in np.meshgrid(*[np.linspace(-1, 1, 9)] * 2, indexing="ij"))

  def zoom(_, state):                                               # the offset 0 keeps the best so far
    u, w, _, du, dw = state
    return (*pick(jnp.maximum(u + du * ou, 0.0), jnp.maximum(w + dw * ow, 1e-12)), du / 4, dw / 4)

  u, w, v, _, _ = jax.lax.fori_loop(0, rounds, zoom, (u, w, jnp.zeros_like(u), du, dw))
  k = jnp.argmin(v, axis=0)[None]                                  # the best start
  u, w = jnp.take_along_axis(u, k, 0)[0], jnp.take_along_axis(w, k, 0)[0]
  return u / top, w / top
