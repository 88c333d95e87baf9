"""One grid point: computing its numbers (both methods, float64) and its file on disk.

A point is one (task kind, d, n, κ_Σ) setting and one method:

  * `construction` (`run_construction`): the GD construction under five step rules
    (`step_rules`: one tuned step, the Marchenko–Pastur-safe step, each prompt's oracle step,
    and c·Σ⁻¹ preconditioned GD) in closed form at every T of grid.loops (up to 200), stored per
    seed under "methods"; and, on the same test prompts with the same error, the reference
    ladder (`ladder.seed_ladder`: CG, Chebyshev, Newton–Schulz, whitened GD, GD++) at the T ≤
    max(grid.trained_loops), under "ladder"; each method becomes results.csv rows of its own;
  * `trained` (`run_trained`): all seeds of a `full` looped transformer trained in one vmapped
    program (`sweep.train_seeds`), read out at every T on the same test prompts, with its
    weights measured against the construction (`linear.weights`).

Seed s draws its test and scan prompts from fold_in(key(grid.eval_seed), s) (`eval_prompts`).
The error (`per_prompt_error`) is the query MSE (linear_regression) or ||Ŵ − W*||_F / ||W*||_F
(vector_generation, the read-out with queries e_1..e_d is Ŵ); beside it each prompt's expected
error over the query E_q (`per_prompt_expected_error`, `linear.expected_error`: from the method's
effective weights — a trained model's are its read-out at the d unit queries; for
vector_generation E_q is the error itself).  Every method's record per T is the distribution over
the test prompts of both (`expected_error.statistics`: the mean of the single-query error, its
median, q90, q99 and fraction below ε·(error at W = 0) named `single_query_*`, the non-finite
count; the mean, median, q90, q99 and fraction below ε of E_q named `expected_*`) and its
distance to least squares.  A point's file, points/<id>.json in the workdir, holds its numbers
and its fingerprint; the study runner (loopicl/study.py) reads and writes it.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopicl import stats, sweep
from loopicl.experiments.reproduce import ladder, step_rules
from loopicl.experiments.reproduce.grid import experiment_config, task_config
from loopicl.linear import construction, expected_error, tasks, weights
from loopicl.linear.model import loop_readouts


@functools.lru_cache(maxsize=8)
def _drawer(task_json: str, num_prompts: int):
  """The compiled draw of (test, scan) for one task (compiled once, reused by every seed)."""
  task = ml_collections.ConfigDict(json.loads(task_json))

  @jax.jit  # one compiled program for both draws (eager sampling compiles every primitive)
  def draw(key):
    return (tasks.sample(jax.random.fold_in(key, 0), task, num_prompts),
            tasks.sample(jax.random.fold_in(key, 1), task, num_prompts))
  return draw


def eval_prompts(task, eval_seed: int, seed: int, num_prompts: int):
  """(test, scan): the held-out prompts of `seed` — the same for both methods. Call under x64."""
  draw = _drawer(json.dumps(task.to_dict(), sort_keys=True), int(num_prompts))
  return draw(jax.random.fold_in(jax.random.key(int(eval_seed)), int(seed)))


def per_prompt_error(readouts, batch: tasks.Batch, kind: str):
  """The grid's error per prompt: readouts [..., batch, d_out, m] -> [..., batch]."""
  if kind == "vector_generation":
    return tasks.relative_weight_error(readouts, batch.W_star)
  return tasks.query_mse(readouts, batch.targets)


def per_prompt_expected_error(W_eff, batch: tasks.Batch, task):
  """Each prompt's expected error over the query, measured like `per_prompt_error`:
  W_eff [..., batch, d_out, d] -> [..., batch].  Query MSE: E_q against the noise-free targets
  (`expected_error.expected_error` with Σ, noise 0); vector generation: its relative weight error
  (it has no random query: E_q is the error itself)."""
  if task.kind == "vector_generation":
    return tasks.relative_weight_error(W_eff, batch.W_star)
  return expected_error.expected_error(W_eff, batch.W_star,
                                       jnp.asarray(expected_error.query_covariance(task), W_eff.dtype))


def _finite_mean(x) -> tuple[float, int]:
  mean, nonfinite = stats.finite_mean(np.asarray(x))
  return float(mean), int(nonfinite)


SCAN_STREAM = 1 << 20  # fold_in index of the scan/validation prompts (seeds are small integers)


def run_construction(config, p: dict) -> dict:
  """The five step rules (`step_rules`: the constant steps tuned once per setting on the scan
  prompts and validated on others) on every seed's test prompts at every T, and the reference
  ladder (`ladder.seed_ladder`) on the same prompts at the T ≤ max(grid.trained_loops)."""
  g = config.grid
  task = task_config(config, p["kind"], p["d"], p["n"], p["kappa"], p.get("noise", 0.0))
  loops = [int(T) for T in p["loops"]]
  ladder_loops = [T for T in loops if T <= max(int(t) for t in g.trained_loops)
                  and int(p["d"]) in [int(x) for x in g.trained_ds]]  # where trained models are
  out = {"seeds": {}}
  with jax.enable_x64(True):
    t0 = time.time()
    tuned = None
    if int(p["d"]) <= int(g.tuned_max_d):  # the scan is O(d³) per prompt: capped by grid.tuned_max_d
      base = jax.random.fold_in(jax.random.key(int(g.eval_seed)), SCAN_STREAM)
      scan = step_rules.spectra(task, jax.random.fold_in(base, 0), int(g.scan_prompts))
      validation = step_rules.spectra(task, jax.random.fold_in(base, 1), int(g.validation_prompts))
      tuned = step_rules.tune(task, scan, validation, loops, float(g.step_shoulder))
      del scan, validation
    out["tune_wall_s"] = time.time() - t0
    for seed in g.seeds:
      test, scan_batch = eval_prompts(task, g.eval_seed, seed, int(g.eval_prompts))
      methods, extra = step_rules.seed_records(task, test, tuned, loops, float(g.epsilon))
      kappa_hat = np.asarray(construction.kappa_hat(test.X))
      rec = {"methods": methods, "kappa_hat": float(np.median(kappa_hat)), **extra}
      # The reference ladder on the same test prompts, with the same error (after the step
      # rules' numbers, which do not depend on it); its seconds are also apart, ladder_wall_s.
      t0 = time.time()
      if ladder_loops and g.ladder:
        rec["ladder"] = ladder.seed_ladder(
            task, test, scan_batch, ladder_loops, g.fixed_loops,
            lambda readouts: per_prompt_error(readouts, test, p["kind"]), extra["threshold"],
            methods=tuple(g.ladder),
            expected_of=lambda W: per_prompt_expected_error(W, test, task))
      out["ladder_wall_s"] = out.get("ladder_wall_s", 0.0) + time.time() - t0
      out["seeds"][str(seed)] = rec
  return out


def _distance(readouts, reference, batch: tasks.Batch, kind: str):
  """Per-prompt distance between two read-outs [..., batch, d_out, m], measured like the error."""
  if kind == "vector_generation":
    return tasks.relative_weight_error(readouts - reference + batch.W_star, batch.W_star)
  return tasks.query_mse(readouts, reference)


def _weight_metrics(P, Q, d_out: int, sigma_inv: np.ndarray) -> dict:
  A = weights.implied_preconditioner(P, Q, d_out)
  return {"weight_distance": float(weights.weight_distance(P, Q, d_out)),
          "offblock_fraction": float(weights.offblock_fraction(P, Q, d_out)),
          "precond_cos_identity": float(weights.matrix_cosine(A, jnp.eye(A.shape[-1], dtype=A.dtype))),
          "precond_cos_sigma_inv": float(weights.matrix_cosine(A, jnp.asarray(sigma_inv, A.dtype))),
          "gd_step_equivalent": float(weights.gd_step_equivalent(P, Q, d_out))}


def run_trained(config, p: dict, log: Callable[[str], None]) -> dict:
  """Trains all seeds of a point in one vmapped program, then reads them out in float64."""
  g = config.grid
  T = p["loops"][0]
  exp = experiment_config(config, p["kind"], p["d"], p["n"], p["kappa"], T)
  result = sweep.train_seeds(exp, list(g.seeds), log=log)
  task = task_config(config, p["kind"], p["d"], p["n"], p["kappa"], p.get("noise", 0.0))
  sigma_inv = np.linalg.inv(tasks.covariance(task))
  d_out, m = int(task.d_out), tasks.num_queries(task)
  out = {"seeds": {}, "train_wall_s": result.wall_s, "train_steps": int(exp.train.steps)}
  with jax.enable_x64(True):
    for k, seed in enumerate(g.seeds):
      P, Q = (jnp.asarray(w, jnp.float64) for w in sweep.seed_model(result, k).weights())
      test, _ = eval_prompts(task, g.eval_seed, seed, int(g.eval_prompts))
      readouts = loop_readouts(P, Q, test.Z0, loops=T, d_out=d_out, n_queries=m)
      per_loop = np.asarray(per_prompt_error(readouts, test, p["kind"]))    # [T, prompts]
      W_eff = expected_error.effective_weights(
          lambda b: loop_readouts(P, Q, b.Z0, loops=T, d_out=d_out, n_queries=b.X_query.shape[-1]),
          test)                                                              # [T, prompts, d_out, d]
      expected = np.asarray(per_prompt_expected_error(W_eff, test, task))
      errors = [_finite_mean(row) for row in per_loop]
      ls = construction.least_squares(test.X, test.Y) @ test.X_query
      to_ls = stats.prompt_distribution(np.asarray(_distance(readouts, ls, test, p["kind"])), 0.0)
      zero = per_prompt_error(jnp.zeros_like(test.targets), test, p["kind"])
      dist = expected_error.statistics(per_loop, expected,
                                       float(g.epsilon) * float(np.mean(np.asarray(zero))))
      loops_rec = {}
      for T_read in p["read_loops"]:
        j = int(T_read) - 1
        loops_rec[str(T_read)] = {**{k: (int(v[j]) if k == "nonfinite" else float(v[j]))
                                     for k, v in dist.items()},
                                  "to_ls_mean": float(to_ls["error"][j]),
                                  "to_ls_median": float(to_ls["error_median"][j])}
      out["seeds"][str(seed)] = {
          "loops": loops_rec,
          "error_per_loop": [e for e, _ in errors],
          "nonfinite_per_loop": [b for _, b in errors],
          "diverged_at_step": int(result.diverged_at[k]),
          "final_train_loss": float(result.final_loss[k]),
          **_weight_metrics(P, Q, d_out, sigma_inv)}
  return out
