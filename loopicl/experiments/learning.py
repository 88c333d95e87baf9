"""Learned from scratch: does training find the best algorithm in the model class? (docs/learning.md)

For each setting (d, n/d, κ_Σ, rotated Σ or not, T) the experiment's training recipe (the
default, `configs/default.py`: random init) trains every seed in one vmapped program
(`sweep.train_seeds`) and each seed is read out in float64 on its own held-out prompts at every
loop 1 … `grid.extrapolation`·T.  Beside it, on the same prompts, the two algorithms the model
class contains and a trained model must reach: GD with one constant step η and preconditioned
GD with A = c·Σ⁻¹.  Their step is the one that minimises the mean error at T over
`grid.tune_prompts` (32 768) prompts drawn apart from every test prompt — the best constant step
for the population, validated on the test prompts like the trained model (`"gd"`, `"pgd"`: the
target).  Also stored: the step best *on the test prompts themselves* (`"gd_hindsight"`,
`"pgd_hindsight"`), an oracle no rule chosen elsewhere can beat — at T = 20 it sits at the edge of
stability of those 2048 prompts, and its mean there can be far below its own mean on other
prompts (docs/learning.md).  Statistics are per seed, over the prompts (`spectral`, closed form):
the mean and median of the single-query error (`error`, `error_median`) and the mean, median and
q90 of each prompt's expected error over the query E_q (`expected_error*`, `linear.expected_error`:
the model's from its read-out at the d unit queries, GD's and PGD's in closed form; for vector
generation E_q is the error itself).

A setting's numbers live in <workdir>/points/<id>.json with a fingerprint of everything they
depend on; rerunning the same command skips finished settings.  `write_outputs` rebuilds
learning.csv, summary.md and the figure from the points.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import config as config_lib, distributed, study, sweep
from loopicl.errors import ConfigError
from loopicl.experiments.reproduce import compute, step_rules
from loopicl.linear import expected_error, spectral, tasks, weights
from loopicl.linear.model import loop_readouts

SETTING_FIELDS = ("d", "n_over_d", "condition_number", "rotate", "loops")
GRID_FIELDS = ("settings", "seeds", "eval_prompts", "eval_seed", "tune_prompts", "extrapolation",
               "target", "cpu_devices", "figures")


def validate(config) -> None:
  """Raises ConfigError (one line) for a bad grid field; the experiment via config.validate."""
  g = config.grid
  for key in g.keys():
    if key not in GRID_FIELDS:
      raise ConfigError(f"config.grid.{key} is an unknown field; allowed: {' | '.join(GRID_FIELDS)}")
  ok = isinstance(g.settings, (tuple, list)) and g.settings and all(
      isinstance(s, (tuple, list)) and len(s) == 5 and int(s[0]) >= 1 and float(s[1]) > 0
      and float(s[2]) >= 1 and isinstance(s[3], bool) and int(s[4]) >= 1 for s in g.settings)
  if not ok:
    raise ConfigError(f"config.grid.settings={g.settings!r} is invalid; allowed: a non-empty tuple "
                      f"of ({', '.join(SETTING_FIELDS)}) with d, T >= 1, n/d > 0, κ >= 1, rotate bool")
  if not g.seeds or not all(isinstance(s, int) and s >= 0 for s in g.seeds):
    raise ConfigError(f"config.grid.seeds={g.seeds!r} is invalid; allowed: a non-empty tuple of "
                      "integers >= 0")
  if not isinstance(g.tune_prompts, int) or isinstance(g.tune_prompts, bool) or g.tune_prompts < 1:
    raise ConfigError(f"config.grid.tune_prompts={g.tune_prompts!r} is invalid; allowed: an "
                      "integer >= 1 (prompts GD's / PGD's step is tuned on)")
  if not isinstance(g.extrapolation, int) or g.extrapolation < 1:
    raise ConfigError(f"config.grid.extrapolation={g.extrapolation!r} is invalid; allowed: an "
                      "integer >= 1 (read loops 1 … extrapolation·T)")
  config_lib.validate(config.experiment)


def setting_dict(s) -> dict:
  d, r, kappa, rotate, T = s
  return {"d": int(d), "n": int(round(float(r) * int(d))), "n_over_d": float(r),
          "condition_number": float(kappa), "rotate": bool(rotate), "loops": int(T)}


def setting_id(p: dict) -> str:
  rot = "_rot" if p["rotate"] and p["condition_number"] > 1 else ""
  return f"d{p['d']}_n{p['n']}_kappa{p['condition_number']:g}{rot}_T{p['loops']}"


def experiment_config(config, p: dict):
  """The training config of one setting: the experiment template with its task and T."""
  exp = copy.deepcopy(config.experiment)
  with exp.unlocked():
    exp.task.d, exp.task.n_context = p["d"], p["n"]
    exp.task.condition_number, exp.task.rotate = p["condition_number"], p["rotate"]
    exp.model.loops = p["loops"]
    exp.eval.seed = int(config.grid.eval_seed)
  return exp


def fingerprint(config, p: dict) -> str:
  g = config.grid
  parts = {"setting": p, "experiment": experiment_config(config, p).to_dict(),
           "grid": [list(g.seeds), g.eval_prompts, g.eval_seed, g.extrapolation, g.tune_prompts],
           "baseline": "argmin of the mean on tune_prompts other prompts + hindsight, zoom 2e-3",
           "statistics": "single-query and expected error (E_q), v1"}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _baselines(task, test, loops: int, read: np.ndarray, tuned: dict) -> dict:
  """GD (η) and PGD (c·Σ⁻¹) on the test prompts at every read loop, with the step `tuned[name]`
  (chosen on other prompts: the target) and with the step minimising the mean at T on the test
  prompts themselves (hindsight): {"gd"|"pgd"|"gd_hindsight"|"pgd_hindsight": {"step",
  "error" [L], "error_median" [L], "expected_error" [L], "expected_error_median" [L],
  "expected_error_q90" [L]}} (closed form, float64)."""
  kind = step_rules.error_kind(task.kind)
  out = {}
  for name in ("gd", "pgd"):
    sp = baseline_spectrum(task, test, name)
    sq = None if kind == "relative" else expected_error.query_decomposition(
        test, expected_error.query_covariance(task),
        whitening=None if name == "gd" else step_rules.whitening(task))
    hindsight, _, _ = spectral.tune_constant_step(sp, [loops], kind=kind, shoulder=None)
    for key, step in ((name, tuned[name]), (name + "_hindsight", float(hindsight[0]))):
      err = np.asarray(spectral.errors(sp, step, read, kind=kind, max_loops=int(read[-1])))
      expected = err if sq is None else np.asarray(
          expected_error.spectral_expected_errors(sq, step, read, max_loops=int(read[-1])))
      out[key] = {"step": step, **_distribution(err, expected)}
  return out


def _distribution(err, expected) -> dict:
  """The per-loop statistics a point stores, from single-query errors and E_q [L, prompts]:
  error, error_median (single query), nonfinite (its count), expected_error,
  expected_error_median, expected_error_q90: lists over the loops."""
  dist = expected_error.statistics(err, expected, 0.0)
  return {"error": dist["error"].tolist(), "error_median": dist["single_query_error_median"].tolist(),
          "nonfinite": dist["nonfinite"].tolist(),
          **{k: dist[k].tolist() for k in ("expected_error", "expected_error_median",
                                           "expected_error_q90")}}


def run_setting(config, p: dict, log: Callable[[str], None]) -> dict:
  """Trains the seeds of one setting and reads them and the two baselines out (float64)."""
  g = config.grid
  exp = experiment_config(config, p)
  result = sweep.train_seeds(exp, list(g.seeds), log=log)
  task, T = exp.task, p["loops"]
  read = np.arange(1, int(g.extrapolation) * T + 1)
  sigma_inv = np.linalg.inv(tasks.covariance(task))
  out = {"train_wall_s": result.wall_s, "train_steps": int(exp.train.steps), "seeds": {}}
  with jax.enable_x64(True):
    t0 = time.time()
    tuned = tuned_steps(config, task, T)
    for k, seed in enumerate(g.seeds):
      test, _ = compute.eval_prompts(task, g.eval_seed, seed, int(g.eval_prompts))
      P, Q = (jnp.asarray(w, jnp.float64) for w in sweep.seed_model(result, k).weights())
      readouts = loop_readouts(P, Q, test.Z0, loops=int(read[-1]), d_out=int(task.d_out),
                               n_queries=tasks.num_queries(task))
      err = np.asarray(compute.per_prompt_error(readouts, test, task.kind))   # [L, prompts]
      W_eff = expected_error.effective_weights(                              # [L, prompts, d_out, d]
          lambda b: loop_readouts(P, Q, b.Z0, loops=int(read[-1]), d_out=int(task.d_out),
                                  n_queries=b.X_query.shape[-1]), test)
      expected = np.asarray(compute.per_prompt_expected_error(W_eff, test, task))
      zero = compute.per_prompt_error(jnp.zeros_like(test.targets), test, task.kind)
      A = weights.implied_preconditioner(P, Q, int(task.d_out))
      out["seeds"][str(seed)] = {
          **_distribution(err, expected), "error_at_zero": float(np.mean(np.asarray(zero))),
          "diverged_at_step": int(result.diverged_at[k]),
          "skipped_steps": int(result.skipped[k]),
          "final_train_loss": float(result.final_loss[k]),
          "P": np.asarray(P).tolist(), "Q": np.asarray(Q).tolist(),
          "offblock_fraction": float(weights.offblock_fraction(P, Q, int(task.d_out))),
          "precond_cos_sigma_inv": float(weights.matrix_cosine(A, jnp.asarray(sigma_inv))),
          "baselines": _baselines(task, test, T, read, tuned)}
    out["eval_wall_s"] = time.time() - t0
  return out


def baseline_spectrum(task, batch, name):
  """GD's (`name` "gd") or PGD's ("pgd": whitened by Σ⁻¹) closed-form decomposition of `batch`."""
  kind = step_rules.error_kind(task.kind)
  tgt = batch.W_star if kind == "relative" else batch.targets
  return spectral.decompose(batch.X, batch.Y, batch.X_query, tgt, kind=kind,
                            whitening=None if name == "gd" else step_rules.whitening(task))


def tuned_steps(config, task, T: int) -> dict:
  """GD's and PGD's constant step that minimises the mean at T over `grid.tune_prompts` prompts
  drawn apart from every seed's held-out ones: {"gd"|"pgd": step}.  Call under x64."""
  key = jax.random.fold_in(jax.random.key(int(config.grid.eval_seed)), 10**6)
  batch = tasks.sample(key, task, int(config.grid.tune_prompts))
  kind = step_rules.error_kind(task.kind)
  return {name: float(spectral.tune_constant_step(baseline_spectrum(task, batch, name), [T], kind=kind,
                                                  shoulder=None)[0][0])
          for name in ("gd", "pgd")}


class LearningStudy:
  """The learning table's settings for the study runner (loopicl/study.py)."""
  point_key = "setting"

  def __init__(self, config):
    self.config = config
    self.seeds = list(config.grid.seeds)

  def points(self):
    return [setting_dict(s) for s in self.config.grid.settings]

  def point_id(self, p):
    return setting_id(p)

  def fingerprint(self, p):
    return fingerprint(self.config, p)

  def compute(self, p, log):
    return run_setting(self.config, p, log)

  def write_outputs(self, workdir, data, figures):
    from loopicl.experiments import learning_outputs
    return learning_outputs.write(self.config, data, workdir, figures=figures)


def load_points(config, workdir: str) -> dict:
  """{setting id: data} for the settings on disk and current."""
  return study.load_points(LearningStudy(config), workdir)


def run(config, workdir: str, *, log: Callable[[str], None] = print) -> list[dict]:
  """Runs (or resumes) every setting; rebuilds the outputs after each; returns the rows."""
  validate(config)
  distributed.set_cpu_devices(int(config.grid.cpu_devices))
  return study.run(LearningStudy(config), workdir, figures=bool(config.grid.figures), log=log)[0]


def write_outputs(config, workdir: str, *, figures: bool = True) -> list[dict]:
  from loopicl.experiments import learning_outputs
  return learning_outputs.write(config, load_points(config, workdir), workdir, figures=figures)
