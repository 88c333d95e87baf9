"""What did the looped transformer learn, and how close is it to gradient descent? (docs/theory.md §3–4)

`analyze(P, Q, task_config, trained_loops=T)` evaluates learned weights (P, Q) on held-out prompts
and returns a JSON-serialisable report: the query error after every loop t = 1..loops_max next to
the baselines a fair comparison needs, von Oswald et al.'s function-space alignment with GD, and
what the weights themselves say (distance to the GD construction, implied preconditioner).
This module computes the numbers; `baselines` defines and tunes the baselines, `ladder` the
ladder of reference algorithms (which one did the loop learn?), `report` reads the weights and
words the findings and writes the files, `plots` draws the figures.

Baselines (`baselines` module docstring): `gd_error` (best constant step η*), `pgd_error`
(c*·Σ⁻¹), `least_squares_error` and `ridge_error` (best λ), tuned at the trained T on *separate*
scan prompts; the two constant ones are repeated per loop to align with `loops`.  And
`bound`: the construction's theory line e₀·ρ^{2t}, e₀ = the mean query MSE at t = 0 (W₀ = 0, so
e₀ = mean ||y_q||² / (d_out·m)) and ρ = (κ̃ − 1)/(κ̃ + 1) with κ̃ the median κ̂ of Σ̂ over the
evaluation prompts.  GD with the per-prompt optimal step contracts ||W_t − W_LS|| by at least
ρ(κ̂) per step, so this is the slope a typical prompt would follow; it is a reference *line*, not
a guarantee for the mean error of constant-step GD (and with label noise the errors level off at
`least_squares_error`, which the line ignores).

The ladder (`ladder`): `cg_error`, `chebyshev_error`, `chebyshev_oracle_error`, `newton_error`
(Newton–Schulz step t, worth 2^t GD steps, compared by loop count), `whitened_gd_error` (fitted
at T on scan prompts), `gdpp_error` (GD++, its (γ, η) = `gdpp_gamma`, `gdpp_step` tuned jointly
at T on the scan prompts) and `gdpp_oracle_error` (each prompt's own (γ, η)), with the model's
distance to each; `closest_algorithm` at T; `mechanism`:
κ̂, λ_min, λ_max of the model's input rows over loops, next to the whitening construction's.

Function-space alignment (von Oswald et al.): a query column only ever influences itself and
evolves linearly given the context (z_q ← (I + P·Z M Zᵀ·Q/n) z_q), so ŷ_t is *linear* in x_q and
the sensitivity S_t = ∂ŷ_t/∂x_q ([d_out, d], the same for every query of a prompt) is the model's
effective weight matrix after t loops; for GD it is W_t.  `query_sensitivities` reads S_t off d
probe queries e_1 … e_d in the same forward pass (checked against `jax.jvp` in the tests).  Per
prompt, `sensitivity_cosine` is the cosine of the flattened S_t and W_t, `sensitivity_l2` their
Frobenius distance, `prediction_l2` the Euclidean distance of the [d_out, m] predictions divided
by √m (RMS over queries); each is averaged over prompts.

Expected error over the query (docs/reproduction.md; `expected_error`): `<name>_error` is the
mean over prompts of one random query's error per prompt and `<name>_error_median` that single-query
error's median, which mixes the query's spread into the prompts'.  For the model (its effective
weights are S_t), GD, PGD, every rung of the ladder, least squares and ridge, the report also has
each prompt's expected error over the query E_q = tr((W − W*) Σ_q (W − W*)ᵀ)/d_out against the
noise-free targets (Σ_q = Σ; I/d for vector generation, whose unit queries leave nothing random: E_q
is its query MSE itself), summarised per loop as `<name>_expected_error` (mean over the finite
prompts), `_median`, `_q90`, `_q99` (NaN counted as +inf; `report.EXPECTED_NAMES`).

Non-finite prompts: a half-trained model can give 1e16 or inf on a few prompts.  Every per-loop
statistic is the mean over the prompts where it is finite (`stats.summarize`), and the report adds
`<name>_nonfinite` (how many of the `num_prompts` were NaN/inf at that loop) and, for errors,
`<name>_median` with NaN counted as +inf.  A mean with no finite prompt, and any non-finite scalar,
is null in JSON; the counts say why.  Huge-but-finite errors do enter the mean (they are real); the
median shows when a few prompts dominate it.

Interpolation: the loss along the straight line (1−α)·(P, Q)_learned + α·(cP_C, Q_C/c) between the
learned weights and the plain-GD construction (P_C, Q_C) at η*.  The function is invariant to
(P, Q) → (cP, Q/c) but a straight line is not, so the construction is first moved along its
symmetry orbit to the point nearest the learned weights (`weights.construction_at_learned_scale`).
The weight heatmaps show the construction at the same scale.

Everything is computed in float64 (learned float32 weights are cast up: the same function,
evaluated without float32's rounding floor, so baselines converged to 1e-12 stay measurable).
Shapes: P, Q: [D, D] with D = d + d_out; prompts as in `tasks.Batch`.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import stats
from loopicl.linear import baselines, construction, expected_error, ladder, model as model_lib
from loopicl.linear import tasks, weights
from loopicl.linear import report as report_lib

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


@functools.partial(jax.jit, static_argnames=("loops", "d_out", "n_queries", "weight_readout",
                                             "trained_loops"))
def per_prompt_metrics(P, Q, batch: tasks.Batch, gd_step, pgd_preconditioner, knobs=None,
                       query_cov=None, *, loops: int, d_out: int, n_queries: int,
                       weight_readout: bool = False,
                       trained_loops: int | None = None) -> dict[str, jax.Array]:
  """Every per-loop, per-prompt number of the report: a dict of [loops, batch] arrays.

  gd_step: scalar η*; pgd_preconditioner: [d, d] (c*·Σ⁻¹); knobs: `ladder.tune`'s dict, or None
  for no ladder; trained_loops: the T of the per-prompt GD++ oracle (default loops).  Keys:
  model_error, gd_weight_error, pgd_weight_error (relative ||W − W*||_F) and, with weight_readout
  (vector_generation: the read-out is Ŵ_t), model_weight_error; for GD, PGD and every rung of the
  ladder the query error and the model's distance to it
  (`ladder.against_model`: GD's as sensitivity_cosine, sensitivity_l2, prediction_l2); with
  query_cov (Σ_q [d, d], `expected_error.query_covariance`) also model_expected_error (from the
  sensitivity S_t, the model's effective weights) and every candidate's `<name>_expected_error`.
  Non-finite values are left in (NaN/inf): summaries handle them.
  """
  preds, sens = query_sensitivities(P, Q, batch.Z0, loops=loops, d_out=d_out, n_queries=n_queries)
  W_gd = construction.gd_iterates(batch.X, batch.Y, steps=loops, step_size=gd_step)[1:]
  W_pgd = construction.gd_iterates(batch.X, batch.Y, steps=loops,
                                   preconditioner=pgd_preconditioner)[1:]   # [loops, batch, d_out, d]
  out = {
      "model_error": tasks.query_mse(preds, batch.targets),
      "gd_weight_error": tasks.relative_weight_error(W_gd, batch.W_star),
      "pgd_weight_error": tasks.relative_weight_error(W_pgd, batch.W_star),
  }
  if weight_readout:  # vector generation: X_query = I, so the read-out block is Ŵ_t itself.
    out["model_weight_error"] = tasks.relative_weight_error(preds, batch.W_star)
  if query_cov is not None:  # S_t is the model's effective weight matrix (module docstring)
    out["model_expected_error"] = expected_error.expected_error(sens, batch.W_star, query_cov)
  algos = {"gd": W_gd, "pgd": W_pgd}
  if knobs is not None:
    algos.update(ladder.iterates(batch, knobs, loops=loops, trained_loops=trained_loops))
  for name, W in algos.items():
    out.update(ladder.against_model(name, W, preds, sens, batch, query_cov))
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


def _geometric_rate(errors: list, upto: int) -> float | None:
  """Per-loop factor r of a least-squares fit error_t ≈ C·r^t over loops 1..upto (finite, > 0)."""
  e = [np.nan if x is None else x for x in errors[:upto]]
  slope = stats.log_linear_slope(np.arange(1, upto + 1), e)
  return None if slope is None else stats.py_float(np.exp(slope))


def _expected_summary(name: str, values) -> dict[str, list]:
  """`<name>_expected_error` (mean over the finite prompts), `_median` (as every report median),
  `_q90`, `_q99` (empirical: a value some prompt has, as results.csv's) per loop, NaN counted as
  +inf, from E_q [loops, batch]; non-finite values are None."""
  s = stats.summarize(values)
  v = np.asarray(values, np.float64)
  q90, q99 = np.quantile(np.where(np.isnan(v), np.inf, v), (0.9, 0.99), axis=-1, method="inverted_cdf")
  base = f"{name}_expected_error"
  return {base: s["mean"], base + "_median": s["median"],
          base + "_q90": [stats.py_float(x) for x in q90],
          base + "_q99": [stats.py_float(x) for x in q99]}


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
    A JSON-serialisable dict (module docstring; `loops` and the `report.PER_LOOP_KEYS` lists aligned).
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
  eta, c_pgd, lam = baselines.tune(sc, task_config, steps=T)
  recipe = (json.dumps(_task_dict(task_config), sort_keys=True), seed, num_scan)  # of the scan prompts
  knobs = ladder.tune(sc, task_config, steps=T, memo=recipe)
  sigma = tasks.covariance(task_config)
  sigma_inv = np.linalg.inv(sigma)
  A_pgd = c_pgd * sigma_inv
  P_cs, Q_cs, scale = weights.construction_at_learned_scale(P_np, Q_np, d_out, eta)

  # Per-prompt metrics, in chunks small enough for the sensitivity tensor.
  columns = int(task_config.n_context) + m + d
  per_prompt = (d + d_out) * columns + (1 + len(ladder.CANDIDATES)) * L * (d_out * (m + d) + 5)
  chunk = max(1, min(num_prompts, _CHUNK_ELEMENTS // per_prompt))
  chunk = -(-num_prompts // -(-num_prompts // chunk))  # equal chunks: one compiled shape
  query_cov = jnp.asarray(expected_error.query_covariance(task_config))
  alphas = np.linspace(0.0, 1.0, n_alpha)
  parts, interp = [], []
  for s in range(0, num_prompts, chunk):
    b = jax.tree.map(lambda x: x[s:s + chunk], ev)
    parts.append(jax.device_get(per_prompt_metrics(
        P, Q, b, jnp.asarray(eta), jnp.asarray(A_pgd), {k: jnp.asarray(v) for k, v in knobs.items()},
        query_cov, loops=L, d_out=d_out, n_queries=m, trained_loops=T,
        weight_readout=task_config.kind == "vector_generation")))
    if s < n_interp:
      k = min(chunk, n_interp - s)
      interp.append(np.asarray(interpolation_errors(
          P, Q, jnp.asarray(P_cs), jnp.asarray(Q_cs), jnp.asarray(alphas), b.Z0[:k], b.targets[:k],
          loops=T, d_out=d_out, n_queries=m)))
  per = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
  interp = np.concatenate(interp, axis=-1)                            # [n_alpha, n_interp]

  W_ls, W_ridge = construction.least_squares(ev.X, ev.Y), construction.ridge(ev.X, ev.Y, lam)
  ls_err = np.asarray(tasks.query_mse(W_ls @ ev.X_query, ev.targets))
  ridge_err = np.asarray(tasks.query_mse(W_ridge @ ev.X_query, ev.targets))
  for name, W in (("least_squares", W_ls), ("ridge", W_ridge)):  # one W for every loop
    per[f"{name}_expected_error"] = np.broadcast_to(
        np.asarray(expected_error.expected_error(W, ev.W_star, query_cov)), (L, num_prompts))
  e0 = float(np.mean(np.square(np.asarray(ev.targets))))
  kappa = float(np.median(np.asarray(construction.kappa_hat(ev.X))))
  rho = float(construction.convergence_rate(kappa)) if np.isfinite(kappa) else 1.0
  loops = list(range(1, L + 1))

  r: dict[str, Any] = {"loops": loops, "trained_loops": T, "loops_max": L,
                       "num_prompts": num_prompts, "num_scan_prompts": num_scan, "seed": seed,
                       "task": _task_dict(task_config)}
  error_keys = ("model_error", "gd_error", "pgd_error") + ladder.ERROR_KEYS
  if task_config.kind == "vector_generation":
    error_keys += ("model_weight_error", "gd_weight_error", "pgd_weight_error")
  for key in error_keys:
    s = stats.summarize(per[key])
    r[key], r[key + "_median"], r[key + "_nonfinite"] = s["mean"], s["median"], s["nonfinite"]
  for name in report_lib.EXPECTED_NAMES:
    r.update(_expected_summary(name, per[f"{name}_expected_error"]))
  for key in ("sensitivity_cosine", "sensitivity_l2", "prediction_l2") + ladder.COMPARISON_KEYS:
    s = stats.summarize(per[key])
    r[key], r[key + "_nonfinite"] = s["mean"], s["nonfinite"]
  for key, v in (("least_squares_error", ls_err), ("ridge_error", ridge_err)):
    s = stats.summarize(v[None])
    r[key] = s["mean"] * L
    r[key + "_median"] = s["median"][0]
  py = stats.py_float
  r["bound"] = [py(e0 * rho ** (2 * t)) for t in loops]
  r.update(gd_step_size=py(eta), pgd_scale=py(c_pgd), ridge_lambda=py(lam),
           bound_initial_error=py(e0), bound_kappa_hat_median=py(kappa), bound_rate=py(rho))
  r.update({k: py(v) for k, v in knobs.items()}, whitened_gd_fit_prompts=min(ladder.FIT_PROMPTS, num_scan),
           gdpp_fit_prompts=num_scan)

  s = stats.summarize(interp)
  r["interpolation"] = [{"alpha": float(a), "error": e, "error_median": md, "nonfinite": nf}
                        for a, e, md, nf in zip(alphas, s["mean"], s["median"], s["nonfinite"])]
  r["interpolation_scale"] = py(scale)
  r["interpolation_prompts"] = n_interp

  r.update(report_lib.weight_report(P_np, Q_np, P_cs, Q_cs, d_out=d_out, eta=eta, c_pgd=c_pgd,
                                    sigma=sigma, sigma_inv=sigma_inv))
  r["at_trained_loops"] = {k: r[k][T - 1] for k in report_lib.PER_LOOP_KEYS}
  r.update(ladder.closest(r, T))
  r["mechanism"] = ladder.mechanism(P, Q, knobs, ev, loops=L, d=d, d_out=d_out, n_queries=m)
  r["model_rate"] = _geometric_rate(r["model_error"], T)
  r["gd_rate"] = _geometric_rate(r["gd_error"], T)
  r["findings"] = report_lib.findings(r)
  return r

