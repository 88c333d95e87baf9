"""Reproduce the source paper's claim: n = O(d) examples suffice, error falls geometrically in T.

The claim (docs/theory.md §3): T loops of the looped linear transformer can run T steps of GD, whose
error after T steps is ≤ ρ(κ̂)^T with ρ = (κ̂ − 1)/(κ̂ + 1) and κ̂ the condition number of the
prompt's empirical covariance — bounded once n is a constant multiple of d, so no exp(T)
examples are needed.  This module runs the grid that tests it, for two methods:

  * `construction`: the exact GD construction with the best *constant* step for that (task, n, T),
    scanned on separate prompts (`construction.best_constant_step`), evaluated in float64;
  * `trained`: a `full` looped transformer trained at that T (one model per T, `grid.train_mode =
    "per_loops"`), or trained once at the largest T with a loss on every loop and read at every
    T (`"window"`).  All seeds of a grid point train in one vmapped program (`sweep.py`).

Error is the query MSE (linear_regression) or ||Ŵ − W*||_F / ||W*||_F (vector_generation, the
read-out with queries e_1..e_d is Ŵ), on the same held-out prompts for both methods: seed s draws
its test and step-scan prompts from fold_in(key(grid.eval_seed), s).

The grid is a set of points (task kind, d, n, κ_Σ, method[, T]); each point writes
`points/<id>.json` in the workdir when it finishes, with a fingerprint of everything that
determines it, so a rerun skips finished points and recomputes a point whose settings changed.
`results.csv` (one row per setting × T × seed × method), the figures and `summary.md` are
rebuilt from the point files after every point.
"""
from __future__ import annotations

import copy
import csv
import functools
import hashlib
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopicl import config as config_lib, distributed, sweep
from loopicl.linear import construction, tasks, weights
from loopicl.linear.model import loop_readouts

TRAIN_MODES = ("per_loops", "window")
CSV_COLUMNS = (
    "task_kind", "d", "n_context", "n_over_d", "condition_number", "loops", "seed", "method",
    "error", "kappa_hat", "theory_rate", "gd_step_size", "gd_error", "ratio_to_construction",
    "diverged", "diverged_at_step", "error_at_freeze", "nonfinite_prompts", "weight_distance",
    "offblock_fraction", "precond_cos_identity", "precond_cos_sigma_inv", "train_mode",
    "trained_loops", "train_steps", "point_wall_s", "error_at_zero",
)


class GridError(ValueError):
  """The reproduce config is invalid; the message is one line naming the field."""


# -- the grid -------------------------------------------------------------------------------------

def validate(config) -> None:
  """Raises GridError (grid fields) or config.ConfigError (experiment fields), one line each."""
  for section in ("experiment", "grid"):
    if section not in config:
      raise GridError(f"config.{section} is missing; a reproduce config needs experiment and grid")
  g = config.grid
  known = {"kinds", "ds", "n_over_d", "condition_numbers", "loops", "trained_loops", "seeds",
           "fixed_loops", "fixed_n_over_d", "eval_prompts", "eval_seed", "train_mode", "figures",
           "cpu_devices", "weight_loops", "condition_train_mode"}
  for key in g.keys():
    if key not in known:
      raise GridError(f"config.grid.{key} is an unknown field; allowed: {' | '.join(sorted(known))}")

  def seq(name, ok, allowed):
    v = g[name]
    if not isinstance(v, (tuple, list)) or not v or not all(ok(x) for x in v):
      raise GridError(f"config.grid.{name}={v!r} is invalid; allowed: a non-empty tuple of {allowed}")

  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
  is_real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  seq("kinds", lambda x: x in tasks.TASK_KINDS, " | ".join(tasks.TASK_KINDS))
  seq("ds", lambda x: is_int(x) and x >= 1, "integers >= 1")
  seq("n_over_d", lambda x: is_real(x) and x > 0, "numbers > 0")
  seq("condition_numbers", lambda x: is_real(x) and x >= 1, "numbers >= 1")
  seq("loops", lambda x: is_int(x) and x >= 1, "integers >= 1")
  seq("trained_loops", lambda x: is_int(x) and x >= 1, "integers >= 1 (() is not allowed)")
  seq("seeds", lambda x: is_int(x) and x >= 0, "integers >= 0")
  if len(set(g.seeds)) != len(g.seeds):
    raise GridError(f"config.grid.seeds={g.seeds!r} is invalid; allowed: distinct integers")
  for name, within in (("fixed_loops", "trained_loops"), ("fixed_n_over_d", "n_over_d")):
    if g[name] not in g[within]:
      raise GridError(f"config.grid.{name}={g[name]!r} is invalid; allowed: one of grid.{within}={g[within]!r}")
  if not set(g.trained_loops) <= set(g.loops):
    raise GridError(f"config.grid.trained_loops={g.trained_loops!r} is invalid; allowed: a subset "
                    f"of grid.loops={g.loops!r}")
  if 1.0 not in [float(k) for k in g.condition_numbers]:
    raise GridError(f"config.grid.condition_numbers={g.condition_numbers!r} is invalid; allowed: "
                    "a tuple containing 1 (the isotropic sweeps)")
  for name, low in (("eval_prompts", 1), ("eval_seed", 0), ("cpu_devices", 0)):
    if not is_int(g.get(name, 0)) or g.get(name, 0) < low:
      raise GridError(f"config.grid.{name}={g[name]!r} is invalid; allowed: an integer >= {low}")
  weight_loops = g.get("weight_loops", ())
  if not isinstance(weight_loops, (tuple, list)) or not all(is_int(x) and x >= 1 for x in weight_loops):
    raise GridError(f"config.grid.weight_loops={weight_loops!r} is invalid; allowed: a tuple of "
                    "integers >= 1 (() for none)")
  for name in ("train_mode", "condition_train_mode"):
    if g.get(name, g.train_mode) not in TRAIN_MODES:
      raise GridError(f"config.grid.{name}={g[name]!r} is invalid; allowed: {' | '.join(TRAIN_MODES)}")
  if not isinstance(g.figures, bool):
    raise GridError(f"config.grid.figures={g.figures!r} is invalid; allowed: True | False")
  # The experiment template must be a valid training config at every T it will be trained at.
  exp = _experiment(config, "linear_regression", g.ds[0], g.ds[0], 1.0, max(g.trained_loops))
  config_lib.validate(exp)


def n_context(d: int, n_over_d: float) -> int:
  """n = round(n_over_d · d), at least 1."""
  return max(1, int(round(float(n_over_d) * d)))


def settings(config) -> list[tuple]:
  """Every (kind, d, n, κ) of the grid: all n/d at κ = 1, and every κ at grid.fixed_n_over_d."""
  g, out = config.grid, []
  for kind in g.kinds:
    for d in g.ds:
      for r in g.n_over_d:
        out.append((kind, int(d), n_context(d, r), 1.0))
      for k in g.condition_numbers:
        if float(k) != 1.0:
          out.append((kind, int(d), n_context(d, g.fixed_n_over_d), float(k)))
  return out


def _loops_for(config, kappa: float, trained: bool) -> list[int]:
  """The T of a setting: κ = 1 settings get every T; κ > 1 settings only grid.fixed_loops."""
  g = config.grid
  if kappa != 1.0:
    return [int(g.fixed_loops)]
  return sorted(int(t) for t in (g.trained_loops if trained else g.loops))


def points(config) -> list[dict]:
  """The grid's points in run order: all constructions first (cheap), then trained models by cost."""
  out = []
  for kind, d, n, kappa in settings(config):
    out.append(dict(kind=kind, d=d, n=n, kappa=kappa, method="construction",
                    loops=_loops_for(config, kappa, trained=False)))
  trained = []
  for kind, d, n, kappa in settings(config):
    loops = _loops_for(config, kappa, trained=True)
    if train_mode_of(config, kappa) == "window":
      trained.append(dict(kind=kind, d=d, n=n, kappa=kappa, method="trained", loops=[max(loops)],
                          read_loops=loops))
      # The weights-vs-T figure needs models trained at smaller T too (a window model has one set
      # of weights for every T it is read at): at n/d = fixed_n_over_d only; no CSV error rows.
      if kappa == 1.0 and n == n_context(d, config.grid.fixed_n_over_d):
        trained += [dict(kind=kind, d=d, n=n, kappa=kappa, method="trained", loops=[int(t)],
                         read_loops=[int(t)], role="weights")
                    for t in sorted(set(config.grid.get("weight_loops", ()))) if int(t) < max(loops)]
    else:
      trained += [dict(kind=kind, d=d, n=n, kappa=kappa, method="trained", loops=[t], read_loops=[t])
                  for t in loops]
  trained.sort(key=lambda p: p["loops"][0] * p["d"] * (p["n"] + p["d"]))
  return out + trained


def train_mode_of(config, kappa: float) -> str:
  """How the models of a setting train: grid.train_mode, except that the κ_Σ > 1 settings (read
  at grid.fixed_loops only) use grid.condition_train_mode when it is set."""
  g = config.grid
  return g.get("condition_train_mode", g.train_mode) if float(kappa) != 1.0 else g.train_mode


def point_id(p: dict) -> str:
  base = f"{p['kind']}_d{p['d']}_n{p['n']}_kappa{p['kappa']:g}_{p['method']}"
  return base + (f"_T{p['loops'][0]}" if p["method"] == "trained" else "")


def _experiment(config, kind, d, n, kappa, loops) -> ml_collections.ConfigDict:
  """The training config of one trained point: the experiment template at (kind, d, n, κ, T)."""
  exp = copy.deepcopy(config.experiment)
  with exp.unlocked():
    exp.task.kind, exp.task.d, exp.task.n_context = kind, int(d), int(n)
    exp.task.condition_number = float(kappa)
    exp.model.loops = int(loops)
    exp.eval.seed = int(config.grid.eval_seed)
    if train_mode_of(config, kappa) == "window":
      exp.train.loss_loops = int(loops)   # every loop is read out, so every loop is trained
      exp.train.loss_normalization = "gd"
  return exp


def fingerprint(config, p: dict) -> str:
  """A hash of everything a point's numbers depend on (a changed setting invalidates it)."""
  g = config.grid
  parts = {"point": p, "seeds": list(g.seeds), "eval": [g.eval_prompts, g.eval_seed],
           "task": {k: v for k, v in config.experiment.task.to_dict().items()}}
  if p["method"] == "trained":
    exp = _experiment(config, p["kind"], p["d"], p["n"], p["kappa"], p["loops"][0])
    train = exp.train.to_dict()
    if train["curriculum_start"] == 0:  # fields that change nothing must not invalidate a point
      train.pop("curriculum_every"), train.pop("curriculum_increment")
    parts.update(model=exp.model.to_dict(), train=train, mode=train_mode_of(config, p["kappa"]))
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- evaluation (float64) -------------------------------------------------------------------------

def _task(config, kind, d, n, kappa):
  t = copy.deepcopy(config.experiment.task)
  with t.unlocked():
    t.kind, t.d, t.n_context, t.condition_number = kind, int(d), int(n), float(kappa)
  return t


def eval_prompts(task_config, eval_seed: int, seed: int, num_prompts: int):
  """(test, scan): the held-out prompts of `seed` — the same for both methods. Call under x64."""
  # One compiled program for both draws (eager sampling compiles every primitive separately).
  @jax.jit
  def draw(key):
    return (tasks.sample(jax.random.fold_in(key, 0), task_config, num_prompts),
            tasks.sample(jax.random.fold_in(key, 1), task_config, num_prompts))
  return draw(jax.random.fold_in(jax.random.key(int(eval_seed)), int(seed)))


def per_prompt_error(readouts, batch: tasks.Batch, kind: str):
  """The grid's error per prompt: readouts [..., batch, d_out, m] -> [..., batch]."""
  if kind == "vector_generation":
    return tasks.relative_weight_error(readouts, batch.W_star)
  return tasks.query_mse(readouts, batch.targets)


def _finite_mean(x: np.ndarray) -> tuple[float, int]:
  finite = np.isfinite(x)
  return (float(np.mean(x[finite])) if finite.any() else float("nan")), int(np.sum(~finite))


@functools.partial(jax.jit, static_argnames="steps")
def _gd_errors_every_step(X, Y, X_query, targets, step_sizes, *, steps: int):
  """Batch-mean query MSE of GD after t = 1..steps, for each step size: [len(step_sizes), steps].

  Non-finite errors (divergence) are +inf so that a search never picks them.
  """
  sigma_hat = construction.empirical_covariance(X)
  b = Y @ jnp.swapaxes(X, -1, -2) / X.shape[-1]

  def errors(eta):
    def step(W, _):
      W = W - eta * (W @ sigma_hat - b)
      err = jnp.mean(jnp.square(W @ X_query - targets))
      return W, jnp.where(jnp.isfinite(err), err, jnp.inf)
    return jax.lax.scan(step, jnp.zeros(b.shape, X.dtype), length=steps)[1]

  return jax.lax.map(errors, step_sizes)


@functools.partial(jax.jit, static_argnames=("steps", "kind"))
def _gd_test_errors(batch: tasks.Batch, step_sizes, *, steps: int, kind: str):
  """Per-prompt grid error (`per_prompt_error`) of GD after t = 1..steps: [len(step_sizes), steps, batch]."""
  sigma_hat = construction.empirical_covariance(batch.X)
  b = batch.Y @ jnp.swapaxes(batch.X, -1, -2) / batch.X.shape[-1]

  def errors(eta):
    def step(W, _):
      W = W - eta * (W @ sigma_hat - b)
      return W, per_prompt_error(W @ batch.X_query, batch, kind)
    return jax.lax.scan(step, jnp.zeros(b.shape, batch.X.dtype), length=steps)[1]

  return jax.lax.map(errors, step_sizes)


def best_constant_steps(X, Y, X_query, targets, loops, *, rel_tol: float = 1e-4,
                        grid_points: int = 48) -> tuple[np.ndarray, np.ndarray]:
  """`construction.best_constant_step` for every T in `loops` at once: (η [L], error [L]).

  The same search — a log grid over [1e-4·η_hi, η_hi] (η_hi = 4 / min prompt λ_max), zoomed
  around each T's best point until its bracket is narrower than rel_tol·η — but one GD run
  yields the error after every t, so all T share each evaluation: a handful of compiled calls
  per setting instead of a handful per (setting, T).
  """
  loops = [int(T) for T in loops]
  steps = max(loops)
  _, lam_max = construction.covariance_extremes(X)
  hi = 4.0 / float(jnp.min(lam_max))

  def evaluate(grids):  # grids: {j: step sizes} -> {j: errors after loops[j] steps}
    flat = np.concatenate(list(grids.values()))
    # Padded to one length (17 per T) so that every zoom round reuses one compiled program.
    flat = np.concatenate([flat, np.full(17 * len(loops) - len(flat), flat[-1])])
    errs = np.asarray(_gd_errors_every_step(X, Y, X_query, targets, jnp.asarray(flat, X.dtype),
                                            steps=steps))                      # [len(flat), steps]
    out, start = {}, 0
    for j, g in grids.items():
      out[j] = errs[start:start + len(g), loops[j] - 1]
      start += len(g)
    return out

  log_grid = np.geomspace(1e-4 * hi, hi, grid_points)
  grids = {j: log_grid for j in range(len(loops))}
  first = np.asarray(_gd_errors_every_step(X, Y, X_query, targets, jnp.asarray(log_grid, X.dtype),
                                           steps=steps))                       # one run, every T
  errors = {j: first[:, T - 1] for j, T in enumerate(loops)}
  best = {}
  while grids:
    zoom = {}
    for j, g in grids.items():
      e = errors[j]
      i = int(np.argmin(e))
      best[j] = (g[i], e[i])
      lo_edge, hi_edge = g[max(i - 1, 0)], g[min(i + 1, len(g) - 1)]
      if (hi_edge - lo_edge) > rel_tol * g[i] and np.isfinite(e[i]):
        zoom[j] = np.linspace(lo_edge, hi_edge, 17)
    grids = zoom
    if grids:  # one call evaluates every unfinished T's zoom grid at every t
      errors = evaluate(grids)
  return (np.array([best[j][0] for j in range(len(loops))]),
          np.array([best[j][1] for j in range(len(loops))]))


def run_construction(config, p: dict) -> dict:
  """Per seed and T: the best constant step (scanned on the scan prompts) and its test error."""
  g = config.grid
  task = _task(config, p["kind"], p["d"], p["n"], p["kappa"])
  out = {"seeds": {}}
  with jax.enable_x64(True):
    for seed in g.seeds:
      test, scan = eval_prompts(task, g.eval_seed, seed, int(g.eval_prompts))
      kappa_hat = np.asarray(construction.kappa_hat(test.X))
      zero = per_prompt_error(jnp.zeros_like(test.targets), test, p["kind"])
      rows = {}
      etas, _ = best_constant_steps(scan.X, scan.Y, scan.X_query, scan.targets, p["loops"])
      per_prompt = np.asarray(_gd_test_errors(test, jnp.asarray(etas), steps=max(p["loops"]),
                                              kind=p["kind"]))                 # [L, T_max, prompts]
      for j, (T, eta) in enumerate(zip(p["loops"], etas)):
        err, bad = _finite_mean(per_prompt[j, T - 1])
        rows[str(T)] = {"error": err, "gd_step_size": float(eta), "nonfinite_prompts": bad}
      out["seeds"][str(seed)] = {"loops": rows, "kappa_hat": float(np.median(kappa_hat)),
                                 "error_at_zero": float(np.mean(np.asarray(zero)))}
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
  exp = _experiment(config, p["kind"], p["d"], p["n"], p["kappa"], T)
  result = sweep.train_seeds(exp, list(g.seeds), log=log)
  task = _task(config, p["kind"], p["d"], p["n"], p["kappa"])
  sigma_inv = np.linalg.inv(tasks.covariance(task))
  d_out, m = int(task.d_out), tasks.num_queries(task)
  out = {"seeds": {}, "train_wall_s": result.wall_s, "train_steps": int(exp.train.steps)}
  with jax.enable_x64(True):
    for k, seed in enumerate(g.seeds):
      params = sweep.seed_params(result, k)
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
      del params
  return out


# -- the run --------------------------------------------------------------------------------------

def run(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the grid in `workdir`; returns {"rows": n, "computed": n, "skipped": n}."""
  validate(config)
  # Host CPU devices for the seed axis (sweep.seed_mesh); must precede any JAX computation.
  distributed.set_cpu_devices(int(config.grid.get("cpu_devices", 0)))
  os.makedirs(os.path.join(workdir, "points"), exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=list)
  todo = points(config)
  start, computed, skipped = time.time(), 0, 0
  for i, p in enumerate(todo, start=1):
    pid, fp = point_id(p), fingerprint(config, p)
    path = os.path.join(workdir, "points", pid + ".json")
    if os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)
      if stored.get("fingerprint") == fp:
        skipped += 1
        continue
      log(f"[{i}/{len(todo)}] {pid}: settings changed since it was computed; recomputing")
    t0 = time.time()
    log(f"[{i}/{len(todo)}] {pid} ({len(config.grid.seeds)} seeds) ...")
    if p["method"] == "construction":
      data = run_construction(config, p)
    else:
      data = run_trained(config, p, log)
    data.update(point=p, fingerprint=fp, wall_s=time.time() - t0, id=pid)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a point is either complete on disk or absent
    computed += 1
    elapsed = time.time() - start
    log(f"[{i}/{len(todo)}] {pid} done in {time.time() - t0:.0f} s ({elapsed:.0f} s so far)")
    write_outputs(config, workdir, figures=False)
  rows = write_outputs(config, workdir, figures=bool(config.grid.figures))
  log(f"grid done: {computed} points computed, {skipped} already there, {len(rows)} rows in "
      f"{os.path.join(workdir, 'results.csv')} ({time.time() - start:.0f} s)")
  return {"rows": len(rows), "computed": computed, "skipped": skipped}


def load_points(config, workdir: str) -> dict:
  """point id -> point data, for the grid's points that are on disk and current."""
  out = {}
  for p in points(config):
    path = os.path.join(workdir, "points", point_id(p) + ".json")
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      if data.get("fingerprint") == fingerprint(config, p):
        out[point_id(p)] = data
  return out


def _construction_index(data: dict) -> dict:
  """(kind, d, n, κ, T, seed) -> (the construction's record at T, its seed's record, its point)."""
  out = {}
  for pt in data.values():
    p = pt["point"]
    if p["method"] == "construction":
      for seed, s in pt["seeds"].items():
        for T, r in s["loops"].items():
          out[(p["kind"], p["d"], p["n"], p["kappa"], int(T), int(seed))] = (r, s, pt)
  return out


def rows_from_points(config, data: dict) -> list[dict]:
  """The results.csv rows (dicts with CSV_COLUMNS) of every finished point."""
  rows = []
  constructions = _construction_index(data)
  for (kind, d, n, kappa, T, seed), (r, s, pt) in constructions.items():
    rows.append(dict(
        task_kind=kind, d=d, n_context=n, n_over_d=n / d, condition_number=kappa, loops=T,
        seed=seed, method="construction", error=r["error"], kappa_hat=s["kappa_hat"],
        theory_rate=float(construction.convergence_rate(s["kappa_hat"])),
        gd_step_size=r["gd_step_size"], gd_error=r["error"], ratio_to_construction=1.0,
        diverged=0, diverged_at_step=-1, error_at_freeze="", nonfinite_prompts=r["nonfinite_prompts"],
        weight_distance=0.0, offblock_fraction=0.0, precond_cos_identity=1.0,
        precond_cos_sigma_inv="", train_mode="", trained_loops="", train_steps=0,
        point_wall_s=pt["wall_s"], error_at_zero=s["error_at_zero"]))
  for pid, pt in data.items():
    p = pt["point"]
    if p["method"] != "trained" or p.get("role") == "weights":
      continue
    T_train = p["loops"][0]
    for seed, s in pt["seeds"].items():
      diverged = s["diverged_at_step"] >= 0
      for T in p["read_loops"]:
        err = s["error_per_loop"][T - 1]
        ref = constructions.get((p["kind"], p["d"], p["n"], p["kappa"], T, int(seed)))
        gd_err = ref[0]["error"] if ref else float("nan")
        rows.append(dict(
            task_kind=p["kind"], d=p["d"], n_context=p["n"], n_over_d=p["n"] / p["d"],
            condition_number=p["kappa"], loops=T, seed=int(seed), method="trained",
            # A diverged seed keeps its last good state; its error is shown apart, never as `error`.
            error=float("nan") if diverged else err,
            kappa_hat=ref[1]["kappa_hat"] if ref else float("nan"),
            theory_rate=float(construction.convergence_rate(ref[1]["kappa_hat"])) if ref else float("nan"),
            gd_step_size="", gd_error=gd_err,
            ratio_to_construction=float("nan") if diverged else err / gd_err,
            diverged=int(diverged), diverged_at_step=s["diverged_at_step"],
            error_at_freeze=err if diverged else "", nonfinite_prompts=s["nonfinite_per_loop"][T - 1],
            weight_distance=s["weight_distance"], offblock_fraction=s["offblock_fraction"],
            precond_cos_identity=s["precond_cos_identity"],
            precond_cos_sigma_inv=s["precond_cos_sigma_inv"], train_mode=train_mode_of(config, p["kappa"]),
            trained_loops=T_train, train_steps=pt["train_steps"], point_wall_s=pt["wall_s"],
            error_at_zero=ref[1]["error_at_zero"] if ref else float("nan")))
  order = lambda r: (r["task_kind"], r["d"], r["condition_number"], r["n_context"], r["method"],
                     r["loops"], r["seed"])
  return sorted(rows, key=order)


WEIGHT_COLUMNS = ("task_kind", "d", "n_context", "n_over_d", "condition_number", "trained_loops",
                  "seed", "train_mode", "diverged", "error", "gd_error", "weight_distance",
                  "offblock_fraction", "precond_cos_identity", "precond_cos_sigma_inv")


def weight_rows_from_points(config, data: dict) -> list[dict]:
  """weights.csv: one row per trained model (point × seed) — its weights against the
  construction, and its error read at the T it was trained at (`trained_loops`)."""
  constructions = _construction_index(data)
  rows = []
  for pt in data.values():
    p = pt["point"]
    if p["method"] != "trained":
      continue
    T = p["loops"][0]
    for seed, s in pt["seeds"].items():
      diverged = s["diverged_at_step"] >= 0
      ref = constructions.get((p["kind"], p["d"], p["n"], p["kappa"], T, int(seed)))
      rows.append(dict(
          task_kind=p["kind"], d=p["d"], n_context=p["n"], n_over_d=p["n"] / p["d"],
          condition_number=p["kappa"], trained_loops=T, seed=int(seed),
          train_mode=train_mode_of(config, p["kappa"]), diverged=int(diverged),
          error=float("nan") if diverged else s["error_per_loop"][T - 1],
          gd_error=ref[0]["error"] if ref else float("nan"),
          **{k: s[k] for k in WEIGHT_COLUMNS[-4:]}))
  return sorted(rows, key=lambda r: (r["task_kind"], r["d"], r["condition_number"], r["n_context"],
                                     r["trained_loops"], r["seed"]))


def _write_csv(path: str, columns, rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
  os.replace(tmp, path)


def write_outputs(config, workdir: str, *, figures: bool = True) -> list[dict]:
  """Rebuilds results.csv, weights.csv, summary.md (and the figures) from the finished points."""
  data = load_points(config, workdir)
  rows = rows_from_points(config, data)
  weight_rows = weight_rows_from_points(config, data)
  _write_csv(os.path.join(workdir, "weights.csv"), WEIGHT_COLUMNS, weight_rows)
  _write_csv(os.path.join(workdir, "results.csv"), CSV_COLUMNS, rows)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(summary_markdown(config, rows))
  if figures and rows:
    for name, fig in make_figures(config, rows, weight_rows).items():
      fig.savefig(os.path.join(workdir, name + ".png"), dpi=110)
  return rows


# -- aggregation, figures, summary ----------------------------------------------------------------

def aggregate(rows: list[dict]) -> dict:
  """(kind, d, n, κ, method, T) -> {mean, lo, hi, n, diverged, seeds, kappa_hat, rate, ...} over seeds.

  mean/lo/hi are the mean, min and max of `error` over the seeds that did not diverge (and have a
  finite error); `diverged` counts the others.
  """
  groups = {}
  for r in rows:
    key = (r["task_kind"], r["d"], r["n_context"], r["condition_number"], r["method"], r["loops"])
    groups.setdefault(key, []).append(r)
  out = {}
  for key, rs in groups.items():
    errs = np.array([float(r["error"]) for r in rs], np.float64)
    ok = np.isfinite(errs)
    def mean_of(field):
      v = np.array([float(r[field]) if r[field] != "" else np.nan for r in rs], np.float64)
      v = v[np.isfinite(v)]
      return float(v.mean()) if v.size else float("nan")
    out[key] = {"mean": float(errs[ok].mean()) if ok.any() else float("nan"),
                "lo": float(errs[ok].min()) if ok.any() else float("nan"),
                "hi": float(errs[ok].max()) if ok.any() else float("nan"),
                "n": int(ok.sum()), "diverged": int(sum(int(r["diverged"]) for r in rs)),
                "seeds": len(rs), "kappa_hat": mean_of("kappa_hat"), "rate": mean_of("theory_rate"),
                "ratio": mean_of("ratio_to_construction"), "error_at_zero": mean_of("error_at_zero"), "weight_distance": mean_of("weight_distance"),
                "offblock_fraction": mean_of("offblock_fraction"),
                "precond_cos_identity": mean_of("precond_cos_identity"),
                "precond_cos_sigma_inv": mean_of("precond_cos_sigma_inv"),
                "nonfinite_prompts": int(sum(int(r["nonfinite_prompts"]) for r in rs))}
  return out


def theory_line(kind: str, rate: float, error_at_zero: float, loops) -> np.ndarray:
  """ρ^T for the relative weight error; e₀·ρ^{2T} for a squared error (query MSE)."""
  loops = np.asarray(loops, np.float64)
  if kind == "vector_generation":
    return rate ** loops
  return error_at_zero * rate ** (2 * loops)


def _figure(nrows, ncols, width=3.3, height=2.8):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(nrows, ncols, squeeze=False)


def _error_label(kind):
  return "relative weight error ||Ŵ−W*||/||W*||" if kind == "vector_generation" else "query MSE"


def _band(ax, x, stats, color, label, marker=None, ls="-"):
  """Mean line with a min–max band over seeds; points with no finite seed are gaps."""
  mean = np.array([s["mean"] for s in stats]); lo = np.array([s["lo"] for s in stats])
  hi = np.array([s["hi"] for s in stats])
  ax.plot(x, mean, color=color, marker=marker, ms=4, ls=ls, label=label)
  ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def _log(ax):
  ys = [y for line in ax.lines for y in np.asarray(line.get_ydata(), float) if np.isfinite(y) and y > 0]
  if ys:
    ax.set_yscale("log")


def make_figures(config, rows: list[dict], weight_rows: list[dict]) -> dict:
  """name -> Figure: error vs T, error vs n/d, error vs κ_Σ (results.csv rows), weights vs the
  trained T (weights.csv rows)."""
  agg, g, figs = aggregate(rows), config.grid, {}
  kinds = [k for k in g.kinds if any(r["task_kind"] == k for r in rows)]
  ds = [int(d) for d in g.ds]
  for kind in kinds:
    # 1. Error vs T, one panel per n/d.
    ratios = list(g.n_over_d)
    fig, axes = _figure(len(ds), len(ratios))
    for i, d in enumerate(ds):
      for j, r in enumerate(ratios):
        ax, n = axes[i, j], n_context(d, r)
        for method, color, marker in (("construction", "C1", None), ("trained", "C0", "o")):
          Ts = sorted(T for (k, dd, nn, kap, m, T) in agg if (k, dd, nn, kap, m) == (kind, d, n, 1.0, method))
          if Ts:
            label = "GD construction (best const. η)" if method == "construction" else "trained (at each T)"
            if method == "trained" and g.train_mode == "window":
              label = f"trained once at T={max(g.trained_loops)} (window), read at T"
            _band(ax, Ts, [agg[(kind, d, n, 1.0, method, T)] for T in Ts], color, label, marker)
            if method == "construction":
              s = agg[(kind, d, n, 1.0, method, Ts[0])]
              T_line = np.arange(0, max(Ts) + 1)
              ax.plot(T_line, theory_line(kind, s["rate"], s["error_at_zero"], T_line), color="gray", ls="--",
                      lw=1, label="theory ((κ̂−1)/(κ̂+1))^T" + ("" if kind == "vector_generation" else " (squared)"))
        ax.set_title(f"d={d}, n={n} (n/d={r:g}), κ̂≈{agg.get((kind, d, n, 1.0, 'construction', 1), {}).get('kappa_hat', float('nan')):.3g}",
                     fontsize=8)
        ax.set_xlabel("loops T")
        if j == 0:
          ax.set_ylabel(_error_label(kind), fontsize=8)
        _log(ax)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{kind}: error vs loops (κ_Σ = 1; mean over seeds, band = min–max)", fontsize=9)
    figs[f"error_vs_loops_{kind}"] = fig

    # 2. Error vs n/d at T = fixed_loops; 3. error vs κ_Σ at (fixed n/d, fixed T).
    T = int(g.fixed_loops)
    fig, axes = _figure(1, 2, width=4.2, height=3.2)
    for d, ls in zip(ds, ("-", "--", ":", "-.")):
      for method, color, marker in (("construction", "C1", "s"), ("trained", "C0", "o")):
        xs = [r for r in ratios if (kind, d, n_context(d, r), 1.0, method, T) in agg]
        if xs:
          _band(axes[0, 0], xs, [agg[(kind, d, n_context(d, r), 1.0, method, T)] for r in xs],
                color, f"{method}, d={d}", marker, ls)
        ks = [float(k) for k in g.condition_numbers
              if (kind, d, n_context(d, g.fixed_n_over_d), float(k), method, T) in agg]
        if ks:
          _band(axes[0, 1], ks, [agg[(kind, d, n_context(d, g.fixed_n_over_d), k, method, T)] for k in ks],
                color, f"{method}, d={d}", marker, ls)
    axes[0, 0].axvline(1.0, color="gray", lw=0.8, ls=":")
    axes[0, 0].set_xscale("log"); axes[0, 0].set_xlabel("n / d")
    axes[0, 0].set_title(f"error vs n/d at T={T} (κ_Σ = 1)", fontsize=9)
    axes[0, 1].set_xscale("log"); axes[0, 1].set_xlabel("κ_Σ (condition number of Σ)")
    axes[0, 1].set_title(f"error vs κ_Σ at n/d={g.fixed_n_over_d:g}, T={T}", fontsize=9)
    for ax in axes[0]:
      ax.set_ylabel(_error_label(kind), fontsize=8); _log(ax); ax.legend(fontsize=6)
    fig.suptitle(kind, fontsize=9)
    figs[f"error_vs_n_and_condition_{kind}"] = fig

    # 4. Learned vs construction: weight distance and implied-preconditioner alignment vs the T a
    # model was trained at (weights.csv: every trained model, seeds averaged).
    fig, axes = _figure(1, 3, width=3.4, height=3.0)
    for d, ls in zip(ds, ("-", "--", ":", "-.")):
      for j, r in enumerate(ratios):
        n = n_context(d, r)
        mine = [w for w in weight_rows if (w["task_kind"], w["d"], w["n_context"], w["condition_number"])
                == (kind, d, n, 1.0) and not w["diverged"]]
        Ts = sorted({w["trained_loops"] for w in mine})
        if not Ts:
          continue
        for ax, field in zip(axes[0], ("weight_distance", "offblock_fraction", "precond_cos_identity")):
          ax.plot(Ts, [np.mean([float(w[field]) for w in mine if w["trained_loops"] == T]) for T in Ts],
                  color=f"C{j}", ls=ls, marker="o", ms=3, label=f"d={d}, n/d={r:g}")
    for ax, title in zip(axes[0], ("distance to the plain-GD line (P⊗Q)", "off-construction fraction",
                                   "cos(implied preconditioner Â, I)")):
      ax.set_title(title, fontsize=8); ax.set_xlabel("loops T the model was trained at")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{kind}: trained weights vs the GD construction (κ_Σ = 1; mean over seeds)", fontsize=9)
    figs[f"weights_vs_loops_{kind}"] = fig
  return figs


def _fmt(x) -> str:
  return "—" if x is None or not np.isfinite(x) else f"{x:.3g}"


HEADLINE_LOOPS = (1, 2, 5, 10, 20)


def headline_table(rows: list[dict], loops=HEADLINE_LOOPS) -> list[str]:
  """Markdown lines: trained vs construction at a few T, with the per-seed ratio range."""
  agg = aggregate(rows)
  ratios = {}
  for r in rows:
    if r["method"] == "trained" and not int(r["diverged"]):
      key = (r["task_kind"], r["d"], r["n_context"], r["condition_number"], r["loops"])
      ratios.setdefault(key, []).append(float(r["ratio_to_construction"]))
  lines = ["## Headline: trained / construction at T ∈ {" + ", ".join(map(str, loops)) + "}", "",
           "| task | d | n/d | κ_Σ | κ̂ (median) | T | construction | trained | trained / construction, seeds min–max | diverged |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for kind, d, n, kap, method, T in sorted(agg):
    t = agg.get((kind, d, n, kap, "trained", T))
    if method != "construction" or T not in loops or t is None:
      continue
    c, rs = agg[(kind, d, n, kap, method, T)], ratios.get((kind, d, n, kap, T), [])
    span = f"{_fmt(min(rs))}–{_fmt(max(rs))}" if rs else "—"
    lines.append(f"| {kind} | {d} | {n / d:g} | {kap:g} | {_fmt(c['kappa_hat'])} | {T} | {_fmt(c['mean'])} | "
                 f"{_fmt(t['mean'])} | {span} | {t['diverged']}/{t['seeds']} |")
  return lines


def summary_markdown(config, rows: list[dict]) -> str:
  """The grid's table (mean [min, max] over seeds) and per-T trained/construction ratios."""
  agg, g = aggregate(rows), config.grid
  lines = ["# Reproduction grid: summary", "",
           f"Trained models: `grid.train_mode = {g.train_mode}` "
           + ("(one model trained at each T)." if g.train_mode == "per_loops"
              else f"(one model trained at T = {max(g.trained_loops)} with a loss on every loop, read at each T)")
           + (f"; κ_Σ > 1 settings: `{train_mode_of(config, 2.0)}`." if train_mode_of(config, 2.0) != g.train_mode else ""),
           "Error: query MSE (linear_regression) or ||Ŵ−W*||_F/||W*||_F (vector_generation), "
           "mean [min, max] over seeds; diverged seeds are counted, not averaged in. "
           "ratio = trained / construction on the same prompts (mean of per-seed ratios).", ""]
  lines += headline_table(rows, loops=HEADLINE_LOOPS) + ["", "## Every grid point", ""]
  lines += ["| task | d | n | n/d | κ_Σ | T | κ̂ (median) | theory ρ^T | construction | trained | ratio | diverged |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  keys = sorted({k[:4] + (k[5],) for k in agg})
  for kind, d, n, kap, T in keys:
    c = agg.get((kind, d, n, kap, "construction", T)); t = agg.get((kind, d, n, kap, "trained", T))
    if c is None:
      continue
    cell = lambda s: "—" if s is None else f"{_fmt(s['mean'])} [{_fmt(s['lo'])}, {_fmt(s['hi'])}]"
    div = f"{t['diverged']}/{t['seeds']}" if t else "—"
    lines.append(f"| {kind} | {d} | {n} | {n / d:g} | {kap:g} | {T} | {_fmt(c['kappa_hat'])} | "
                 f"{_fmt(c['rate'] ** T)} | {cell(c)} | {cell(t)} | {_fmt(t['ratio']) if t else '—'} | {div} |")
  # Geometric decrease of the construction: the fitted per-loop factor vs the theory rate.
  lines += ["", "## Per-loop contraction of the construction (κ_Σ = 1)", "",
            "Fitted factor = exp(slope of log error vs T over the grid's T), square-rooted for the MSE "
            "so that it compares with ρ = (κ̂−1)/(κ̂+1).", "",
            "| task | d | n/d | κ̂ (median) | theory ρ | fitted factor |", "|---|---|---|---|---|---|"]
  for kind in g.kinds:
    for d in g.ds:
      for r in g.n_over_d:
        n = n_context(d, r)
        Ts = sorted(k[5] for k in agg if k[:5] == (kind, d, n, 1.0, "construction"))
        if len(Ts) < 2:
          continue
        e = np.array([agg[(kind, d, n, 1.0, "construction", T)]["mean"] for T in Ts])
        slope = np.polyfit(Ts, np.log(e), 1)[0]
        factor = math.exp(slope / (1 if kind == "vector_generation" else 2))
        c = agg[(kind, d, n, 1.0, "construction", Ts[0])]
        lines.append(f"| {kind} | {d} | {r:g} | {_fmt(c['kappa_hat'])} | {_fmt(c['rate'])} | {_fmt(factor)} |")
  return "\n".join(lines) + "\n"
