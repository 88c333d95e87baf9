"""One grid point: computing its numbers (both methods, float64) and its file on disk.

A point is one (task kind, d, n, κ_Σ) setting and one method:

  * `construction` (`run_construction`): GD with the best *constant* step for each T, scanned on
    the seed's scan prompts (`construction.best_constant_steps`), its error on the test prompts;
    and, on the same test prompts with the same error, the reference-algorithm ladder
    (`ladder.seed_ladder`: CG, Chebyshev, Newton–Schulz, whitened GD), stored per seed under
    "ladder" and written as results.csv rows of their own methods;
  * `trained` (`run_trained`): all seeds of a `full` looped transformer trained in one vmapped
    program (`sweep.train_seeds`), read out at every T on the same test prompts, with its
    weights measured against the construction (`linear.weights`).

Seed s draws its test and scan prompts from fold_in(key(grid.eval_seed), s) (`eval_prompts`).
The error (`per_prompt_error`) is the query MSE (linear_regression) or ||Ŵ − W*||_F / ||W*||_F
(vector_generation, the read-out with queries e_1..e_d is Ŵ); means are over the finite prompts,
with the count of the others.  A point's file, points/<id>.json in the workdir, holds its numbers
and its fingerprint; `read_point`/`write_point`/`load_points` are the only code that touches it.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import stats, sweep
from loopicl.experiments.reproduce import ladder
from loopicl.experiments.reproduce.grid import (experiment_config, fingerprint, point_id, points,
                                                task_config)
from loopicl.linear import construction, tasks, weights
from loopicl.linear.model import loop_readouts


def eval_prompts(task, eval_seed: int, seed: int, num_prompts: int):
  """(test, scan): the held-out prompts of `seed` — the same for both methods. Call under x64."""
  # One compiled program for both draws (eager sampling compiles every primitive separately).
  @jax.jit
  def draw(key):
    return (tasks.sample(jax.random.fold_in(key, 0), task, num_prompts),
            tasks.sample(jax.random.fold_in(key, 1), task, num_prompts))
  return draw(jax.random.fold_in(jax.random.key(int(eval_seed)), int(seed)))


def per_prompt_error(readouts, batch: tasks.Batch, kind: str):
  """The grid's error per prompt: readouts [..., batch, d_out, m] -> [..., batch]."""
  if kind == "vector_generation":
    return tasks.relative_weight_error(readouts, batch.W_star)
  return tasks.query_mse(readouts, batch.targets)


def _finite_mean(x) -> tuple[float, int]:
  mean, nonfinite = stats.finite_mean(np.asarray(x))
  return float(mean), int(nonfinite)


@functools.partial(jax.jit, static_argnames=("steps", "kind"))
def _gd_test_errors(batch: tasks.Batch, step_sizes, *, steps: int, kind: str):
  """Per-prompt grid error of GD after t = 1..steps: [len(step_sizes), steps, batch]."""
  return construction.gd_errors(batch.X, batch.Y, step_sizes,
                                lambda W: per_prompt_error(W @ batch.X_query, batch, kind),
                                steps=steps)


def run_construction(config, p: dict) -> dict:
  """Per seed and T: the best constant step (scanned on the scan prompts) and its test error,
  and the reference ladder's errors (`ladder.seed_ladder`) on the same test prompts."""
  g = config.grid
  task = task_config(config, p["kind"], p["d"], p["n"], p["kappa"])
  out = {"seeds": {}}
  with jax.enable_x64(True):
    for seed in g.seeds:
      test, scan = eval_prompts(task, g.eval_seed, seed, int(g.eval_prompts))
      kappa_hat = np.asarray(construction.kappa_hat(test.X))
      zero = per_prompt_error(jnp.zeros_like(test.targets), test, p["kind"])
      rows = {}
      etas, _ = construction.best_constant_steps(scan.X, scan.Y, scan.X_query, scan.targets,
                                                 p["loops"])
      per_prompt = np.asarray(_gd_test_errors(test, jnp.asarray(etas), steps=max(p["loops"]),
                                              kind=p["kind"]))                 # [L, T_max, prompts]
      for j, (T, eta) in enumerate(zip(p["loops"], etas)):
        err, bad = _finite_mean(per_prompt[j, T - 1])
        rows[str(T)] = {"error": err, "gd_step_size": float(eta), "nonfinite_prompts": bad}
      out["seeds"][str(seed)] = {"loops": rows, "kappa_hat": float(np.median(kappa_hat)),
                                 "error_at_zero": float(np.mean(np.asarray(zero)))}
      # The reference ladder on the same test prompts, with the same error (after GD's numbers,
      # which do not depend on it); its seconds are part of wall_s and also apart, ladder_wall_s.
      t0 = time.time()
      out["seeds"][str(seed)]["ladder"] = ladder.seed_ladder(
          task, test, scan, p["loops"], g.fixed_loops,
          lambda readouts: per_prompt_error(readouts, test, p["kind"]))
      out["ladder_wall_s"] = out.get("ladder_wall_s", 0.0) + time.time() - t0
  return out


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
  task = task_config(config, p["kind"], p["d"], p["n"], p["kappa"])
  sigma_inv = np.linalg.inv(tasks.covariance(task))
  d_out, m = int(task.d_out), tasks.num_queries(task)
  out = {"seeds": {}, "train_wall_s": result.wall_s, "train_steps": int(exp.train.steps)}
  with jax.enable_x64(True):
    for k, seed in enumerate(g.seeds):
      P, Q = (jnp.asarray(w, jnp.float64) for w in sweep.seed_model(result, k).weights())
      test, _ = eval_prompts(task, g.eval_seed, seed, int(g.eval_prompts))
      readouts = loop_readouts(P, Q, test.Z0, loops=T, d_out=d_out, n_queries=m)
      per_loop = np.asarray(per_prompt_error(readouts, test, p["kind"]))    # [T, prompts]
      errors = [_finite_mean(row) for row in per_loop]
      out["seeds"][str(seed)] = {
          "error_per_loop": [e for e, _ in errors],
          "nonfinite_per_loop": [b for _, b in errors],
          "diverged_at_step": int(result.diverged_at[k]),
          "final_train_loss": float(result.final_loss[k]),
          **_weight_metrics(P, Q, d_out, sigma_inv)}
  return out


def _point_path(workdir: str, p: dict) -> str:
  return os.path.join(workdir, "points", point_id(p) + ".json")


def read_point(workdir: str, p: dict) -> dict | None:
  """The point's file as stored (current or not), or None when it is absent."""
  path = _point_path(workdir, p)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_point(workdir: str, p: dict, data: dict) -> None:
  """Writes the point's file atomically: a point is either complete on disk or absent.

  Plain json (not `jsonfile`): a mean over no finite prompt is NaN and must read back as NaN.
  """
  path = _point_path(workdir, p)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def load_points(config, workdir: str) -> dict:
  """point id -> point data, for the grid's points that are on disk and current."""
  out = {}
  for p in points(config):
    data = read_point(workdir, p)
    if data is not None and data.get("fingerprint") == fingerprint(config, p):
      out[point_id(p)] = data
  return out
