"""What did the looped transformer learn, and how close is it to gradient descent? (docs/theory.md §3–4)

`analyze(P, Q, task_config, trained_loops=T)` evaluates learned weights (P, Q) on held-out prompts
and returns a JSON-serialisable report: the query error after every loop t = 1..loops_max next to
the baselines a fair comparison needs, von Oswald et al.'s function-space alignment with GD, and
what the weights themselves say (distance to the GD construction, implied preconditioner).

Baselines (all on the same evaluation prompts; every tuned knob is tuned at the trained T on a
*separate* set of scan prompts, so no baseline is fitted to the prompts it is scored on):
  * `gd_error`: plain GD with the best constant step η* (`construction.best_constant_step`);
  * `pgd_error`: preconditioned GD with A = c*·Σ⁻¹, Σ = `tasks.covariance(task)`.  PGD with cΣ⁻¹
    on (X, X_query) is exactly plain GD with step c on the whitened prompts (Σ^{-1/2}X,
    Σ^{-1/2}X_query) — the same targets, the same iterates up to W ↦ WΣ^{1/2} — so c* is found by
    the very same precise search as η*;
  * `least_squares_error` (minimum-norm, the point GD converges to) and `ridge_error` at the best λ
    (a zoomed log-grid search); both are constant in t, repeated per loop to align with `loops`;
  * `bound`: the construction's theory line e₀·ρ^{2t}, e₀ = the mean query MSE at t = 0 (W₀ = 0, so
    e₀ = mean ||y_q||² / (d_out·m)) and ρ = (κ̃ − 1)/(κ̃ + 1) with κ̃ the median κ̂ of Σ̂ over the
    evaluation prompts.  GD with the per-prompt optimal step contracts ||W_t − W_LS|| by at least
    ρ(κ̂) per step, so this is the slope a typical prompt would follow; it is a reference *line*,
    not a guarantee for the mean error of constant-step GD (and with label noise the errors level
    off at `least_squares_error`, which the line ignores).

Function-space alignment (von Oswald et al.): a query column only ever influences itself and
evolves linearly given the context (z_q ← (I + P·Z M Zᵀ·Q/n) z_q), so ŷ_t is *linear* in x_q and
the sensitivity S_t = ∂ŷ_t/∂x_q ([d_out, d], the same for every query of a prompt) is the model's
effective weight matrix after t loops; for GD it is W_t.  `query_sensitivities` reads S_t off d
probe queries e_1 … e_d in the same forward pass (checked against `jax.jvp` in the tests).  Per
prompt, `sensitivity_cosine` is the cosine of the flattened S_t and W_t, `sensitivity_l2` their
Frobenius distance, `prediction_l2` the Euclidean distance of the [d_out, m] predictions divided
by √m (RMS over queries); each is averaged over prompts.

Non-finite prompts: a half-trained model can give 1e16 or inf on a few prompts.  Every per-loop
statistic is the mean over the prompts where it is finite, and the report adds `<name>_nonfinite`
(how many of the `num_prompts` were NaN/inf at that loop) and, for errors, `<name>_median` over all
prompts with NaN counted as +inf — so the median is honest while fewer than half the prompts blow
up.  A mean with no finite prompt, and any non-finite scalar, is written as null (JSON `null`);
the counts say why.  Huge-but-finite errors do enter the mean (they are real); the median is there
to show when a few prompts dominate it.

Interpolation: the loss along the straight line (1−α)·(P, Q)_learned + α·(cP_C, Q_C/c) between the
learned weights and the plain-GD construction (P_C, Q_C) at η*.  The function is invariant to
(P, Q) → (cP, Q/c) but a straight line is not, so the construction is first moved along its
symmetry orbit to the point nearest the learned weights: c minimizes ||P_L − cP_C||² + ||Q_L −
Q_C/c||², a root of the quartic p·c⁴ − a·c³ + b·c − q = 0 (a = ⟨P_L, P_C⟩, b = ⟨Q_L, Q_C⟩,
p = ||P_C||², q = ||Q_C||²).  The weight heatmaps show the construction at the same scale.

Everything is computed in float64 (learned float32 weights are cast up: the same function,
evaluated without float32's rounding floor, so baselines converged to 1e-12 stay measurable).
Shapes: P, Q: [D, D] with D = d + d_out; prompts as in `tasks.Batch`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.linear import construction, model as model_lib, tasks, weights

# Loop-indexed report lists (aligned with `loops`) that `write_report` tabulates.
PER_LOOP_KEYS = ("model_error", "gd_error", "pgd_error", "least_squares_error", "ridge_error",
                 "bound", "sensitivity_cosine", "sensitivity_l2", "prediction_l2")

# A ratio inside [1 − TIE, 1 + TIE] reads as "matches" in the findings.
TIE = 0.05
# |Im λ| above this fraction of max |λ| counts as a complex eigenvalue.
COMPLEX_TOL = 1e-6
# Per-chunk element budget for the loop states [chunk, D, n + m + d] (float64) and read-outs.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Per-prompt quantities (jitted, vectorised over prompts).

def query_sensitivities(P: jax.Array, Q: jax.Array, Z0: jax.Array, *, loops: int, d_out: int,
                        n_queries: int) -> tuple[jax.Array, jax.Array]:
  """Read-outs and the sensitivity ∂ŷ/∂x_q after every loop, from one forward pass.

  Given the context, a query column evolves linearly and independently of the other queries
  (module docstring), so ŷ_t = S_t x_q with S_t = ∂ŷ_t/∂x_q the same for every query of a prompt.
  Appending d probe queries e_1 … e_d (label rows 0) therefore reads S_t off as their read-outs:
  exact, and ~20× cheaper than d forward-mode passes, which also push tangents through the
  context, where they are zero.  `query_sensitivities_autodiff` is the `jax.jvp` reference the
  tests compare it with.
  Args:
    P, Q: [D, D]; Z0: [batch, D, n + m] prompts (m = n_queries).
  Returns:
    (readouts [loops, batch, d_out, m], S [loops, batch, d_out, d]).
  """
  D = Z0.shape[-2]
  d = D - d_out
  probes = jnp.zeros((D, d), Z0.dtype).at[:d].set(jnp.eye(d, dtype=Z0.dtype))
  Z = jnp.concatenate([Z0, jnp.broadcast_to(probes, Z0.shape[:-2] + (D, d))], axis=-1)
  out = model_lib.loop_readouts(P, Q, Z, loops=loops, d_out=d_out, n_queries=n_queries + d)
  return out[..., :n_queries], out[..., n_queries:]


def query_sensitivities_autodiff(P: jax.Array, Q: jax.Array, Z0: jax.Array, *, loops: int,
                                 d_out: int, n_queries: int) -> jax.Array:
  """∂ŷ_t[b, o, j] / ∂x_q[b, i, j] by `jax.jvp` through `loop_readouts`: [loops, batch, d_out, m, d].

  Derivatives across query columns are 0 (the mask), so one tangent per input coordinate i, set
  in every query column at once, gives all of them.  The reference for `query_sensitivities`.
  """
  d = Z0.shape[-2] - d_out
  n = Z0.shape[-1] - n_queries
  x_query = Z0[..., :d, n:]

  def readouts(xq):
    return model_lib.loop_readouts(P, Q, Z0.at[..., :d, n:].set(xq), loops=loops, d_out=d_out,
                                   n_queries=n_queries)

  def along(i):
    tangent = jnp.zeros_like(x_query).at[..., i, :].set(1.0)
    return jax.jvp(readouts, (x_query,), (tangent,))[1]

  return jnp.moveaxis(jax.vmap(along)(jnp.arange(d)), 0, -1)


@functools.partial(jax.jit, static_argnames=("loops", "d_out", "n_queries", "weight_readout"))
def per_prompt_metrics(P, Q, batch: tasks.Batch, gd_step, pgd_preconditioner, *, loops: int,
                       d_out: int, n_queries: int, weight_readout: bool = False) -> dict[str, jax.Array]:
  """Every per-loop, per-prompt number of the report: a dict of [loops, batch] arrays.

  gd_step: scalar η*; pgd_preconditioner: [d, d] (c*·Σ⁻¹).  Keys: model_error, gd_error,
  pgd_error, gd_weight_error, pgd_weight_error (relative ||W − W*||_F) and, with weight_readout
  (vector_generation: the read-out is Ŵ_t), model_weight_error; sensitivity_cosine,
  sensitivity_l2, prediction_l2.  Non-finite values are left in (NaN/inf): summaries handle them.
  """
  m = n_queries
  preds, sens = query_sensitivities(P, Q, batch.Z0, loops=loops, d_out=d_out, n_queries=m)
  W_gd = construction.gd_iterates(batch.X, batch.Y, steps=loops, step_size=gd_step)[1:]
  W_pgd = construction.gd_iterates(batch.X, batch.Y, steps=loops,
                                   preconditioner=pgd_preconditioner)[1:]   # [loops, batch, d_out, d]
  gd_preds = W_gd @ batch.X_query
  out = {
      "model_error": tasks.query_mse(preds, batch.targets),
      "gd_error": tasks.query_mse(gd_preds, batch.targets),
      "pgd_error": tasks.query_mse(W_pgd @ batch.X_query, batch.targets),
      "gd_weight_error": tasks.relative_weight_error(W_gd, batch.W_star),
      "pgd_weight_error": tasks.relative_weight_error(W_pgd, batch.W_star),
  }
  if weight_readout:  # vector generation: X_query = I, so the read-out block is Ŵ_t itself.
    out["model_weight_error"] = tasks.relative_weight_error(preds, batch.W_star)
  # GD's sensitivity ∂(W_t x_q)/∂x_q is W_t itself.
  dot = jnp.sum(sens * W_gd, axis=(-2, -1))
  norms = jnp.sqrt(jnp.sum(sens ** 2, axis=(-2, -1)) * jnp.sum(W_gd ** 2, axis=(-2, -1)))
  out["sensitivity_cosine"] = dot / norms
  out["sensitivity_l2"] = jnp.sqrt(jnp.sum((sens - W_gd) ** 2, axis=(-2, -1)))
  out["prediction_l2"] = jnp.sqrt(jnp.sum((preds - gd_preds) ** 2, axis=(-2, -1)) / m)
  return out


@functools.partial(jax.jit, static_argnames=("loops", "d_out", "n_queries"))
def interpolation_errors(P0, Q0, P1, Q1, alphas, Z0, targets, *, loops: int, d_out: int,
                         n_queries: int) -> jax.Array:
  """Query MSE after `loops` loops at (1−α)(P0, Q0) + α(P1, Q1): [len(alphas), batch]."""
  def at(alpha):
    P, Q = (1 - alpha) * P0 + alpha * P1, (1 - alpha) * Q0 + alpha * Q1
    out = model_lib.loop_readouts(P, Q, Z0, loops=loops, d_out=d_out, n_queries=n_queries)[-1]
    return tasks.query_mse(out, targets)
  return jax.lax.map(at, alphas)


# ----------------------------------------------------------------------------------------------
# Baseline tuning on scan prompts.

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
  the bracket's ratio is below 1 + rel_tol.  Noise-free prompts with n ≥ d end at the lower edge
  (ridge → least squares), which is the right answer.
  """
  scale = float(jnp.mean(jnp.trace(construction.empirical_covariance(X), axis1=-2, axis2=-1))) / X.shape[-2]
  scale = scale if np.isfinite(scale) and scale > 0 else 1.0
  grid = np.geomspace(1e-10 * scale, 1e2 * scale, grid_points)
  while True:
    errors = np.asarray(_ridge_errors(X, Y, X_query, targets, jnp.asarray(grid, X.dtype)))
    i = int(np.argmin(errors))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    if hi / lo <= 1 + rel_tol or not np.isfinite(errors[i]):
      return float(grid[i]), float(errors[i])
    grid = np.geomspace(lo, hi, 17)


def nearest_on_orbit(P_learned, Q_learned, P_c, Q_c) -> float:
  """c minimizing ||P_L − c·P_C||² + ||Q_L − Q_C/c||² over real c ≠ 0 (module docstring)."""
  PL, QL, PC, QC = (np.asarray(x, np.float64) for x in (P_learned, Q_learned, P_c, Q_c))
  a, b = float(np.sum(PL * PC)), float(np.sum(QL * QC))
  p, q = float(np.sum(PC * PC)), float(np.sum(QC * QC))
  if not all(np.isfinite([a, b, p, q])) or p == 0 or q == 0:
    return 1.0
  roots = np.roots([p, -a, 0.0, b, -q])
  candidates = [r.real for r in roots if abs(r.imag) <= 1e-6 * max(1.0, abs(r)) and r.real != 0]

  def f(c):
    return p * c * c - 2 * a * c + q / (c * c) - 2 * b / c
  # p c⁴ + … − q has a real root of each sign (value −q < 0 at 0, → +∞ at ±∞), so never empty.
  return float(min(candidates, key=f)) if candidates else 1.0


# ----------------------------------------------------------------------------------------------
# Summaries that never average a non-finite value in.

def _py(x) -> float | None:
  """A Python float, or None for NaN/inf (JSON null)."""
  x = float(x)
  return x if math.isfinite(x) else None


def summarize(values: np.ndarray) -> dict[str, list]:
  """[loops, batch] -> {'mean': finite-prompt means, 'median': NaN→+inf medians, 'nonfinite': counts}."""
  v = np.asarray(values, np.float64)
  finite = np.isfinite(v)
  count = finite.sum(axis=-1)
  with np.errstate(invalid="ignore", over="ignore"):
    total = np.where(finite, v, 0.0).sum(axis=-1)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
  median = np.median(np.where(np.isnan(v), np.inf, v), axis=-1)
  return {"mean": [_py(x) for x in mean], "median": [_py(x) for x in median],
          "nonfinite": [int(x) for x in v.shape[-1] - count]}


def _geometric_rate(errors: list, upto: int) -> float | None:
  """Per-loop factor r of a least-squares fit error_t ≈ C·r^t over loops 1..upto (finite, > 0)."""
  t = np.arange(1, upto + 1)
  e = np.array([np.nan if x is None else x for x in errors[:upto]], np.float64)
  ok = np.isfinite(e) & (e > 0)
  if ok.sum() < 2:
    return None
  slope = np.polyfit(t[ok], np.log(e[ok]), 1)[0]
  return _py(np.exp(slope))


def _matrix_list(A) -> list:
  return [[_py(x) for x in row] for row in np.asarray(A, np.float64)]


def _task_dict(task_config) -> dict:
  raw = task_config.to_dict() if hasattr(task_config, "to_dict") else dict(task_config)
  return json.loads(json.dumps(raw, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


# ----------------------------------------------------------------------------------------------
# The report.

def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")


def analyze(P, Q, task_config, *, trained_loops: int, loops_max: int = 40, num_prompts: int = 4096,
            seed: int = 0, d_out: int | None = None, num_scan_prompts: int | None = None,
            interpolation_points: int = 21, interpolation_prompts: int | None = None) -> dict[str, Any]:
  """The evaluation report of learned weights (P, Q): [D, D] each, D = d + d_out.

  Args:
    task_config: the `task` section the weights were trained on.
    trained_loops: T, the loop count the model was trained at (baselines are tuned at T).
    loops_max: evaluate loops 1..loops_max (>= T).
    num_prompts: held-out evaluation prompts; `num_scan_prompts` (default: the same number) more
      prompts, drawn from an independent key, tune η*, c* and λ*.
    seed: evaluation prompts come from fold_in(key(seed), 0), scan prompts from fold_in(…, 1).
    d_out: checked against task_config.d_out if given.
    interpolation_points: α values in [0, 1] (evenly spaced, both ends included).
    interpolation_prompts: score the line on the first min(this, num_prompts) evaluation prompts
      (default all: then α = 0 is exactly `model_error` at T; each point costs T loops).
  Returns:
    A JSON-serialisable dict (module docstring; `loops` and the PER_LOOP_KEYS lists aligned).
  """
  tasks.validate(task_config)
  _check_int("trained_loops", trained_loops, 1)
  _check_int("loops_max", loops_max, 1)
  _check_int("num_prompts", num_prompts, 1)
  _check_int("interpolation_points", interpolation_points, 2)
  interpolation_prompts = num_prompts if interpolation_prompts is None else interpolation_prompts
  _check_int("interpolation_prompts", interpolation_prompts, 1)
  if loops_max < trained_loops:
    raise ValueError(f"loops_max={loops_max} is invalid; allowed: an integer >= trained_loops={trained_loops}")
  num_scan_prompts = num_prompts if num_scan_prompts is None else num_scan_prompts
  _check_int("num_scan_prompts", num_scan_prompts, 1)
  task_d_out = int(task_config.d_out)
  if d_out is not None and d_out != task_d_out:
    raise ValueError(f"d_out={d_out!r} is invalid; allowed: task.d_out={task_d_out}")
  d, m = int(task_config.d), tasks.num_queries(task_config)
  D = d + task_d_out
  P_np, Q_np = np.asarray(P, np.float64), np.asarray(Q, np.float64)
  if P_np.shape != (D, D) or Q_np.shape != (D, D):
    raise ValueError(f"P, Q have shapes {P_np.shape}, {Q_np.shape}; allowed: ({D}, {D}) for "
                     f"d={d}, d_out={task_d_out}")
  start = time.perf_counter()
  with jax.enable_x64(True):
    report = _analyze64(P_np, Q_np, task_config, T=int(trained_loops), L=int(loops_max),
                        num_prompts=int(num_prompts), num_scan=int(num_scan_prompts),
                        seed=int(seed), d=d, d_out=task_d_out, m=m,
                        n_alpha=int(interpolation_points),
                        n_interp=int(min(interpolation_prompts, num_prompts)))
  report["seconds"] = time.perf_counter() - start
  return report


def _analyze64(P_np, Q_np, task_config, *, T, L, num_prompts, num_scan, seed, d, d_out, m, n_alpha,
               n_interp):
  root = jax.random.key(seed)
  ev = tasks.sample(jax.random.fold_in(root, 0), task_config, num_prompts)
  sc = tasks.sample(jax.random.fold_in(root, 1), task_config, num_scan)
  P, Q = jnp.asarray(P_np), jnp.asarray(Q_np)

  # Baselines tuned at the trained T on the scan prompts.
  eta, _ = construction.best_constant_step(sc.X, sc.Y, sc.X_query, sc.targets, steps=T)
  c_pgd, _ = best_preconditioner_scale(sc.X, sc.Y, sc.X_query, sc.targets, task_config, steps=T)
  lam, _ = best_ridge(sc.X, sc.Y, sc.X_query, sc.targets)
  sigma = tasks.covariance(task_config)
  sigma_inv = np.linalg.inv(sigma)
  A_pgd = c_pgd * sigma_inv
  P_c, Q_c = (np.asarray(w) for w in construction.gd_params(d, d_out, step_size=eta))
  scale = nearest_on_orbit(P_np, Q_np, P_c, Q_c)
  P_cs, Q_cs = scale * P_c, Q_c / scale

  # Per-prompt metrics, in chunks small enough for the sensitivity tensor.
  columns = int(task_config.n_context) + m + d
  chunk = max(1, min(num_prompts, _CHUNK_ELEMENTS // max(1, (d + d_out) * columns + L * d_out * (m + d))))
  alphas = np.linspace(0.0, 1.0, n_alpha)
  parts, interp = [], []
  for s in range(0, num_prompts, chunk):
    b = jax.tree.map(lambda x: x[s:s + chunk], ev)
    parts.append(jax.device_get(per_prompt_metrics(
        P, Q, b, jnp.asarray(eta), jnp.asarray(A_pgd), loops=L, d_out=d_out, n_queries=m,
        weight_readout=task_config.kind == "vector_generation")))
    if s < n_interp:
      k = min(chunk, n_interp - s)
      interp.append(np.asarray(interpolation_errors(
          P, Q, jnp.asarray(P_cs), jnp.asarray(Q_cs), jnp.asarray(alphas), b.Z0[:k], b.targets[:k],
          loops=T, d_out=d_out, n_queries=m)))
  per = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
  interp = np.concatenate(interp, axis=-1)                            # [n_alpha, n_interp]

  ls_err = np.asarray(tasks.query_mse(construction.least_squares(ev.X, ev.Y) @ ev.X_query, ev.targets))
  ridge_err = np.asarray(tasks.query_mse(construction.ridge(ev.X, ev.Y, lam) @ ev.X_query, ev.targets))
  e0 = float(np.mean(np.square(np.asarray(ev.targets))))
  kappa = float(np.median(np.asarray(construction.kappa_hat(ev.X))))
  rho = float(construction.convergence_rate(kappa)) if np.isfinite(kappa) else 1.0
  loops = list(range(1, L + 1))

  r: dict[str, Any] = {"loops": loops, "trained_loops": T, "loops_max": L,
                       "num_prompts": num_prompts, "num_scan_prompts": num_scan, "seed": seed,
                       "task": _task_dict(task_config)}
  for key in ("model_error", "gd_error", "pgd_error"):
    s = summarize(per[key])
    r[key], r[key + "_median"], r[key + "_nonfinite"] = s["mean"], s["median"], s["nonfinite"]
  if task_config.kind == "vector_generation":
    for key in ("model_weight_error", "gd_weight_error", "pgd_weight_error"):
      s = summarize(per[key])
      r[key], r[key + "_median"], r[key + "_nonfinite"] = s["mean"], s["median"], s["nonfinite"]
  for key in ("sensitivity_cosine", "sensitivity_l2", "prediction_l2"):
    s = summarize(per[key])
    r[key], r[key + "_nonfinite"] = s["mean"], s["nonfinite"]
  for key, v in (("least_squares_error", ls_err), ("ridge_error", ridge_err)):
    s = summarize(v[None])
    r[key] = s["mean"] * L
    r[key + "_median"] = s["median"][0]
  r["bound"] = [_py(e0 * rho ** (2 * t)) for t in loops]
  r.update(gd_step_size=_py(eta), pgd_scale=_py(c_pgd), ridge_lambda=_py(lam),
           bound_initial_error=_py(e0), bound_kappa_hat_median=_py(kappa), bound_rate=_py(rho))

  s = summarize(interp)
  r["interpolation"] = [{"alpha": float(a), "error": e, "error_median": md, "nonfinite": nf}
                        for a, e, md, nf in zip(alphas, s["mean"], s["median"], s["nonfinite"])]
  r["interpolation_scale"] = _py(scale)
  r["interpolation_prompts"] = n_interp

  r.update(_weight_report(P_np, Q_np, d_out=d_out, eta=eta, c_pgd=c_pgd, sigma=sigma,
                          sigma_inv=sigma_inv))
  r["weights"] = {"P": _matrix_list(P_np), "Q": _matrix_list(Q_np),
                  "P_construction": _matrix_list(P_cs), "Q_construction": _matrix_list(Q_cs)}
  i = T - 1
  r["at_trained_loops"] = {k: r[k][i] for k in PER_LOOP_KEYS}
  r["model_rate"] = _geometric_rate(r["model_error"], T)
  r["gd_rate"] = _geometric_rate(r["gd_error"], T)
  r["findings"] = findings(r)
  return r


def _weight_report(P, Q, *, d_out, eta, c_pgd, sigma, sigma_inv) -> dict[str, Any]:
  """Scalars and matrices describing (P, Q) against the construction and c·Σ⁻¹."""
  d = P.shape[0] - d_out
  A = np.asarray(weights.implied_preconditioner(P, Q, d_out), np.float64)
  identity = np.eye(d)
  gd_A, pgd_A = eta * identity, c_pgd * sigma_inv
  out: dict[str, Any] = {
      "weight_distance": _py(weights.weight_distance(P, Q, d_out)),
      "offblock_fraction": _py(weights.offblock_fraction(P, Q, d_out)),
      "gd_step_equivalent": _py(weights.gd_step_equivalent(P, Q, d_out)),
      "preconditioner_cosine_identity": _py(weights.matrix_cosine(A, identity)),
      "preconditioner_distance_identity_scaled": _py(weights.relative_distance_after_scaling(A, identity)),
      "preconditioner_cosine_sigma_inv": _py(weights.matrix_cosine(A, sigma_inv)),
      "preconditioner_distance_sigma_inv_scaled": _py(weights.relative_distance_after_scaling(A, sigma_inv)),
  }
  with np.errstate(all="ignore"):
    # Unscaled: does Â match the tuned baselines' own preconditioners, not just their direction?
    out["preconditioner_distance_gd"] = _py(np.linalg.norm(A - gd_A) / np.linalg.norm(gd_A))
    out["preconditioner_distance_pgd"] = _py(np.linalg.norm(A - pgd_A) / np.linalg.norm(pgd_A))
    norm = np.linalg.norm(A)
    anti = 0.5 * (A - A.T)
    out["preconditioner_norm"] = _py(norm)
    out["preconditioner_asymmetry"] = _py(np.linalg.norm(A - A.T) / norm)
    out["preconditioner_max_asymmetry"] = _py(np.max(np.abs(A - A.T)))
    out["preconditioner_symmetric_fraction"] = _py(np.linalg.norm(0.5 * (A + A.T)) / norm)
    out["preconditioner_antisymmetric_fraction"] = _py(np.linalg.norm(anti) / norm)
  finite = bool(np.all(np.isfinite(A)))
  if finite:
    eig = np.linalg.eigvals(A)
    eig = eig[np.lexsort((eig.imag, -np.abs(eig)))]
    scale = max(float(np.max(np.abs(eig))), 1e-300)
    n_complex = int(np.sum(np.abs(eig.imag) > COMPLEX_TOL * scale))
    # Population iteration matrix I − ΣÂ: its spectral radius is the per-loop contraction of
    # preconditioned GD with Â on the expected covariance (|1 − η| for plain GD on Σ = I).
    contraction = float(np.max(np.abs(np.linalg.eigvals(identity - sigma @ A))))
  else:
    eig, n_complex, contraction = np.zeros(0, complex), 0, float("nan")
  out.update(
      preconditioner_eigenvalues_real=[_py(x) for x in eig.real],
      preconditioner_eigenvalues_imag=[_py(x) for x in eig.imag],
      preconditioner_complex_eigenvalues=n_complex,
      population_contraction=_py(contraction),
      implied_preconditioner=_matrix_list(A),
      pgd_preconditioner=_matrix_list(pgd_A),
      sigma_inv=_matrix_list(sigma_inv),
  )
  return out


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3g}"


def findings(r: dict[str, Any]) -> list[str]:
  """Short sentences read off the report's numbers (what a reader should notice first)."""
  T, i = r["trained_loops"], r["trained_loops"] - 1
  out = []
  model, gd, pgd = r["model_error"][i], r["gd_error"][i], r["pgd_error"][i]
  nonfinite = r["model_error_nonfinite"][i]
  if model is None:
    out.append(f"model error at T={T} is non-finite on all {r['num_prompts']} prompts")
  else:
    same = pgd is not None and gd is not None and abs(pgd - gd) <= 1e-9 * abs(gd)
    for name, ref in (("the best constant-step GD" + (" (= preconditioned GD with c·Σ⁻¹: Σ ∝ I)"
                                                       if same else ""), gd),
                      ("preconditioned GD with c·Σ⁻¹", None if same else pgd)):
      if ref is not None and ref > 0:
        ratio = model / ref
        verdict = "beats" if ratio < 1 - TIE else ("loses to" if ratio > 1 + TIE else "matches")
        out.append(f"model error at T={T} is {ratio:.3g}× {name} ({_fmt(model)} vs {_fmt(ref)}): "
                   f"the model {verdict} it")
    ls = r["least_squares_error"][0]
    if ls is not None:
      out.append(f"least squares (the GD fixed point) reaches {_fmt(ls)}; ridge at λ={_fmt(r['ridge_lambda'])} "
                 f"{_fmt(r['ridge_error'][0])}")
  if nonfinite:
    out.append(f"{nonfinite} of {r['num_prompts']} prompts give a non-finite prediction at T={T} "
               f"(means are over the finite ones; median {_fmt(r['model_error_median'][i])})")
  counts = r["model_error_nonfinite"]
  if max(counts) and max(counts) != nonfinite:
    first = next(t for t, k in zip(r["loops"], counts) if k)
    worst = max(counts)
    out.append(f"non-finite predictions start at loop {first}; at worst {worst} of "
               f"{r['num_prompts']} prompts (loop {r['loops'][counts.index(worst)]})")
  med = r["model_error_median"][i]
  if model is not None and med is not None and med > 0 and model / med > 10:
    out.append(f"the mean model error at T={T} is {model / med:.3g}× its median: a few prompts dominate it")
  if r["model_rate"] is not None and r["gd_rate"] is not None:
    out.append(f"per-loop error factor up to T (fit error ≈ C·r^t): model r = {r['model_rate']:.3g}, "
               f"GD r = {r['gd_rate']:.3g}")
  L = r["loops_max"]
  if L > T and model is not None:
    late = r["model_error"][L - 1]
    if late is None:
      out.append(f"past the trained T the model diverges: every prompt is non-finite at loop {L}")
    elif late > model * (1 + TIE):
      out.append(f"past the trained T the error grows: {_fmt(late)} at loop {L} vs {_fmt(model)} at T={T}")
    else:
      out.append(f"past the trained T the error keeps falling or holds: {_fmt(late)} at loop {L}")
  asym, n_complex = r["preconditioner_asymmetry"], r["preconditioner_complex_eigenvalues"]
  if asym is not None:
    kind = "non-symmetric" if asym > TIE else "near-symmetric"
    out.append(f"implied preconditioner is {kind}: ||A−Aᵀ||/||A|| = {asym:.3g}, "
               f"{n_complex} complex eigenvalues")
    out.append(f"implied preconditioner vs η*·I: cosine {_fmt(r['preconditioner_cosine_identity'])}, "
               f"relative distance {_fmt(r['preconditioner_distance_gd'])}; vs c*·Σ⁻¹: cosine "
               f"{_fmt(r['preconditioner_cosine_sigma_inv'])}")
  out.append(f"weights are {_fmt(r['weight_distance'])} from the plain-GD line (P⊗Q sine), "
             f"{_fmt(r['offblock_fraction'])} of ||P⊗Q|| outside the construction's blocks, "
             f"GD-step equivalent η̂ = {_fmt(r['gd_step_equivalent'])} (η* = {_fmt(r['gd_step_size'])})")
  cos, l2 = r["sensitivity_cosine"][i], r["sensitivity_l2"][i]
  out.append(f"at T={T} the sensitivity ∂ŷ/∂x_q has cosine {'n/a' if cos is None else f'{cos:.4f}'} with GD's (L2 distance "
             f"{_fmt(l2)}); predictions differ by {_fmt(r['prediction_l2'][i])} (L2)")
  errs = [p["error"] for p in r["interpolation"]]
  finite = [e for e in errs if e is not None]
  if finite and errs[0] is not None and errs[-1] is not None:
    peak = max(finite)
    ends = max(errs[0], errs[-1])
    shape = (f"a barrier ({peak / ends:.3g}× the worse end)" if peak > ends * (1 + TIE)
             else "no barrier")
    out.append(f"along the straight line learned → construction the error goes {_fmt(errs[0])} → "
               f"{_fmt(errs[-1])} with {shape}")
  return out


# ----------------------------------------------------------------------------------------------
# Output.

def _json_clean(x):
  """Recursively: numpy scalars/arrays → Python, NaN/inf floats → None."""
  if isinstance(x, dict):
    return {str(k): _json_clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return _json_clean(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return _py(x)
  return x


def report_markdown(report: dict[str, Any]) -> str:
  """A readable summary: scalars, findings and one table row per loop (the trained T in bold)."""
  r = report
  lines = [f"# Evaluation: {r['task'].get('kind', '?')}, d={r['task'].get('d')}, "
           f"n={r['task'].get('n_context')}, trained T={r['trained_loops']}", "",
           "## Findings", ""]
  lines += [f"- {f}" for f in r["findings"]]
  lines += ["", "## Scalars", "", "| quantity | value |", "|---|---|"]
  for k, v in r.items():
    if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
      lines.append(f"| {k} | {v if isinstance(v, int) else _fmt(v)} |")
  cols = [("model_error", "model"), ("model_error_median", "model median"),
          ("model_error_nonfinite", "non-finite"), ("gd_error", "GD η*"), ("pgd_error", "PGD c·Σ⁻¹"),
          ("least_squares_error", "LS"), ("ridge_error", "ridge"), ("bound", "theory line"),
          ("sensitivity_cosine", "sens. cos"), ("sensitivity_l2", "sens. L2"),
          ("prediction_l2", "pred. L2")]
  if "model_weight_error" in r:
    cols.insert(3, ("model_weight_error", "model ||Ŵ−W*||/||W*||"))
  lines += ["", "## Per loop", "", "| t | " + " | ".join(c for _, c in cols) + " |",
            "|---" * (len(cols) + 1) + "|"]
  for j, t in enumerate(r["loops"]):
    cells = [str(r[k][j]) if k.endswith("nonfinite") else _fmt(r[k][j]) for k, _ in cols]
    row = f"| {t} | " + " | ".join(cells) + " |"
    lines.append(row.replace("| ", "| **", 1).replace(f"**{t} |", f"**{t}** |")
                 if t == r["trained_loops"] else row)
  lines += ["", "## Interpolation (learned → construction, at T)", "", "| α | error | median | non-finite |",
            "|---|---|---|---|"]
  lines += [f"| {p['alpha']:.3g} | {_fmt(p['error'])} | {_fmt(p['error_median'])} | {p['nonfinite']} |"
            for p in r["interpolation"]]
  lines += ["", "## Figures", ""]
  lines += [f"![{name}]({name}.png)" for name in ("errors", "sensitivity", "weights",
                                                   "preconditioner", "interpolation")]
  return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], outdir: str, P=None, Q=None, *,
                 figures: dict | None = None) -> dict[str, str]:
  """Writes report.json, report.md, one PNG per figure and (if given) weights.npz with P, Q.

  figures: name → matplotlib Figure; default `plots.all_figures(report)`.  Returns name → path.
  """
  from loopicl.linear import plots  # matplotlib is only needed for output.
  os.makedirs(outdir, exist_ok=True)
  paths = {"json": os.path.join(outdir, "report.json"), "markdown": os.path.join(outdir, "report.md")}
  with open(paths["json"], "w") as f:
    json.dump(_json_clean(report), f, indent=1, allow_nan=False)
  with open(paths["markdown"], "w") as f:
    f.write(report_markdown(report))
  if P is not None and Q is not None:
    paths["weights_npz"] = os.path.join(outdir, "weights.npz")
    np.savez(paths["weights_npz"], P=np.asarray(P), Q=np.asarray(Q))
  figures = plots.all_figures(report) if figures is None else figures
  for name, fig in figures.items():
    paths[name] = os.path.join(outdir, f"{name}.png")
    with np.errstate(over="ignore"):  # a log axis over a 1e300 error overflows harmlessly
      fig.savefig(paths[name], dpi=110)
  return paths


# Scalars worth a TensorBoard time series over training steps.
TB_SCALARS = ("weight_distance", "offblock_fraction", "gd_step_equivalent", "gd_step_size",
              "preconditioner_cosine_identity", "preconditioner_cosine_sigma_inv",
              "preconditioner_asymmetry", "preconditioner_complex_eigenvalues",
              "population_contraction", "model_rate", "gd_rate")


def log_to_tensorboard(report: dict[str, Any], figures: dict | None, logdir: str, step: int, *,
                       per_loop: bool = True, prefix: str = "analysis") -> None:
  """Logs the headline numbers, findings and figures at training step `step` (tensorboardX).

  `<prefix>/<key>_at_T` and the TB_SCALARS are indexed by `step`; with per_loop, the per-loop
  curves go to `<prefix>_by_loop/<key>` indexed by the loop t (a curve over loops, not over
  training: a later evaluation adds points at the same t).  Null (non-finite) values are skipped.
  The default prefix keeps clear of the training loop's own `eval/` tags, so this can write into
  the run's TensorBoard directory.
  """
  from tensorboardX import SummaryWriter
  writer = SummaryWriter(logdir)
  try:
    i = report["trained_loops"] - 1
    for k in PER_LOOP_KEYS:
      if report[k][i] is not None:
        writer.add_scalar(f"{prefix}/{k}_at_T", report[k][i], step)
    if report["model_error"][i] is not None and report["gd_error"][i]:
      writer.add_scalar(f"{prefix}/model_over_gd_at_T", report["model_error"][i] / report["gd_error"][i], step)
    writer.add_scalar(f"{prefix}/model_nonfinite_at_T", report["model_error_nonfinite"][i], step)
    for k in TB_SCALARS:
      if report.get(k) is not None:
        writer.add_scalar(f"{prefix}/{k}", report[k], step)
    if per_loop:
      for k in PER_LOOP_KEYS:
        for t, v in zip(report["loops"], report[k]):
          if v is not None:
            writer.add_scalar(f"{prefix}_by_loop/{k}", v, t)
    writer.add_text(f"{prefix}/findings", "\n".join(f"- {f}" for f in report["findings"]), step)
    for name, fig in (figures or {}).items():
      writer.add_figure(f"{prefix}/{name}", fig, step, close=False)
  finally:
    writer.close()
