"""The reproduction grid's spec: which points it has, how each is configured, and its fingerprint.

A reproduce config is `experiment` (a training config template) plus `grid`: task kinds, d,
n/d, κ_Σ, T, seeds, the trained-model mode (`grid.train_mode`: one model per T, "per_loops", or
one model trained at the largest T with a loss on every loop and read at every T, "window").
This module validates it (`validate`, one-line `GridError`s), enumerates its settings and points
in run order (`settings`, `points`, `point_id`), builds the training config of a trained point
(`experiment_config`) and the task config of a setting (`task_config`), and hashes everything a
point's numbers depend on (`fingerprint`) so that a rerun skips finished points.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math

import ml_collections

from loopicl import config as config_lib
from loopicl.experiments.reproduce import ladder, step_rules
from loopicl.linear import spectral, tasks

TRAIN_MODES = ("per_loops", "window")
# What a point's records hold, beyond the grid fields: a change here recomputes every point (the
# records gained each prompt's expected error over the query, E_q, beside the single-query error).
RECORD_VERSION = "single-query and expected error (E_q), v1"


class GridError(ValueError):
  """The reproduce config is invalid; the message is one line naming the field."""


def validate(config) -> None:
  """Raises GridError (grid fields) or config.ConfigError (experiment fields), one line each."""
  for section in ("experiment", "grid"):
    if section not in config:
      raise GridError(f"config.{section} is missing; a reproduce config needs experiment and grid")
  g = config.grid
  known = {"kinds", "ds", "n_over_d", "condition_numbers", "loops", "trained_loops", "seeds",
           "fixed_loops", "fixed_n_over_d", "eval_prompts", "eval_seed", "train_mode", "figures",
           "cpu_devices", "weight_loops", "condition_train_mode", "trained_ds", "noise_stds",
           "scan_prompts", "validation_prompts", "epsilon", "step_shoulder", "ladder",
           "tuned_max_d", "noise_kinds", "trained_n_over_d"}
  for key in g.keys():
    if key not in known:
      raise GridError(f"config.grid.{key} is an unknown field; allowed: {' | '.join(sorted(known))}")
  for key in sorted(known - set(g.keys())):  # every field's default lives in configs/reproduce.py
    raise GridError(f"config.grid.{key} is missing; a grid config builds on configs/reproduce.py")

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
  seq("loops", lambda x: is_int(x) and 1 <= x <= spectral.MAX_LOOPS,
      f"integers in [1, {spectral.MAX_LOOPS}]")
  if not isinstance(g.ladder, (tuple, list)) or not all(m in ladder.METHODS for m in g.ladder):
    raise GridError(f"config.grid.ladder={g.ladder!r} is invalid; allowed: a tuple of "
                    f"{' | '.join(ladder.METHODS)} (() for none)")
  if not isinstance(g.noise_kinds, (tuple, list)) or not all(k in tasks.TASK_KINDS for k in g.noise_kinds):
    raise GridError(f"config.grid.noise_kinds={g.noise_kinds!r} is invalid; allowed: a tuple of "
                    f"{' | '.join(tasks.TASK_KINDS)}")
  seq("trained_n_over_d", lambda x: x in g.n_over_d, f"members of grid.n_over_d={tuple(g.n_over_d)!r}")
  seq("trained_ds", lambda x: x in g.ds, f"members of grid.ds={tuple(g.ds)!r}")
  if not isinstance(g.noise_stds, (tuple, list)) or not all(is_real(x) and x >= 0 for x in g.noise_stds):
    raise GridError(f"config.grid.noise_stds={g.noise_stds!r} is invalid; allowed: a tuple of "
                    "numbers >= 0 (() for noise-free only)")
  for name, ok, allowed in (("epsilon", lambda x: is_real(x) and 0 < x < 1, "a number in (0, 1)"),
                            ("step_shoulder", lambda x: is_real(x) and x >= 1, "a number >= 1"),
                            ("scan_prompts", lambda x: is_int(x) and x >= 16, "an integer >= 16"),
                            ("tuned_max_d", lambda x: is_int(x) and x >= 1, "an integer >= 1"),
                            ("validation_prompts", lambda x: is_int(x) and x >= 16, "an integer >= 16")):
    if not ok(g[name]):
      raise GridError(f"config.grid.{name}={g[name]!r} is invalid; allowed: {allowed}")
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
    if not is_int(g[name]) or g[name] < low:
      raise GridError(f"config.grid.{name}={g[name]!r} is invalid; allowed: an integer >= {low}")
  weight_loops = g.weight_loops
  if not isinstance(weight_loops, (tuple, list)) or not all(is_int(x) and x >= 1 for x in weight_loops):
    raise GridError(f"config.grid.weight_loops={weight_loops!r} is invalid; allowed: a tuple of "
                    "integers >= 1 (() for none)")
  for name in ("train_mode", "condition_train_mode"):
    if g.get(name, g.train_mode) not in TRAIN_MODES:
      raise GridError(f"config.grid.{name}={g[name]!r} is invalid; allowed: {' | '.join(TRAIN_MODES)}")
  if not isinstance(g.figures, bool):
    raise GridError(f"config.grid.figures={g.figures!r} is invalid; allowed: True | False")
  # The experiment template must be a valid training config at every T it will be trained at.
  exp = experiment_config(config, "linear_regression", g.ds[0], g.ds[0], 1.0, max(g.trained_loops))
  config_lib.validate(exp)


def n_context(d: int, n_over_d: float) -> int:
  """n = round(n_over_d · d), at least 1."""
  return max(1, int(round(float(n_over_d) * d)))


def settings(config) -> list[tuple]:
  """Every (kind, d, n, κ, σ) of the grid: the n/d sweep at κ = 1, σ = 0 at every d of grid.ds;
  at the d of grid.trained_ds also each κ > 1 at grid.fixed_n_over_d, and (for the kinds of
  grid.noise_kinds) the n/d sweep at each σ > 0 of grid.noise_stds."""
  g, out = config.grid, []
  for kind in g.kinds:
    for d in g.ds:
      extra = int(d) in [int(x) for x in g.trained_ds]
      out += [(kind, int(d), n_context(d, r), 1.0, 0.0) for r in g.n_over_d]
      for k in ([float(k) for k in g.condition_numbers if float(k) != 1.0] if extra else []):
        out.append((kind, int(d), n_context(d, g.fixed_n_over_d), k, 0.0))
      for sigma in (g.noise_stds if extra and kind in g.noise_kinds else ()):
        if float(sigma) > 0:
          out += [(kind, int(d), n_context(d, r), 1.0, float(sigma)) for r in g.n_over_d]
  return out


def trains(config, kind, d, n, kappa, sigma) -> bool:
  """Whether a setting has trained models: noise-free, d in grid.trained_ds, and n/d in
  grid.trained_n_over_d (κ_Σ = 1) or = grid.fixed_n_over_d (κ_Σ > 1, read at grid.fixed_loops)."""
  g = config.grid
  at_n = [n_context(d, r) for r in g.trained_n_over_d] if kappa == 1.0 else [n_context(d, g.fixed_n_over_d)]
  return sigma == 0.0 and int(d) in [int(x) for x in g.trained_ds] and n in at_n


def _loops_for(config, kappa: float, trained: bool) -> list[int]:
  """The T of a setting: constructions at every T (cheap in closed form); trained models at
  grid.trained_loops when κ = 1, at grid.fixed_loops only when κ > 1."""
  g = config.grid
  if trained and kappa != 1.0:
    return [int(g.fixed_loops)]
  return sorted(int(t) for t in (g.trained_loops if trained else g.loops))


def points(config) -> list[dict]:
  """The grid's points in run order: all constructions first (cheap), then trained models by cost."""
  out = []
  for kind, d, n, kappa, sigma in settings(config):
    out.append(dict(kind=kind, d=d, n=n, kappa=kappa, noise=sigma, method="construction",
                    loops=_loops_for(config, kappa, trained=False)))
  trained = []
  for kind, d, n, kappa, sigma in settings(config):
    if not trains(config, kind, d, n, kappa, sigma):
      continue
    loops = _loops_for(config, kappa, trained=True)
    if train_mode_of(config, kappa) == "window":
      trained.append(dict(kind=kind, d=d, n=n, kappa=kappa, noise=sigma, method="trained",
                          loops=[max(loops)], read_loops=loops))
      # The weights-vs-T figure needs models trained at smaller T too (a window model has one set
      # of weights for every T it is read at): at n/d = fixed_n_over_d only; no CSV error rows.
      if kappa == 1.0 and n == n_context(d, config.grid.fixed_n_over_d):
        trained += [dict(kind=kind, d=d, n=n, kappa=kappa, noise=sigma, method="trained",
                         loops=[int(t)], read_loops=[int(t)], role="weights")
                    for t in sorted(set(config.grid.weight_loops)) if int(t) < max(loops)]
    else:
      trained += [dict(kind=kind, d=d, n=n, kappa=kappa, noise=sigma, method="trained", loops=[t],
                       read_loops=[t]) for t in loops]
  trained.sort(key=lambda p: p["loops"][0] * p["d"] * (p["n"] + p["d"]))
  return out + trained


def train_mode_of(config, kappa: float) -> str:
  """How the models of a setting train: grid.train_mode, except that the κ_Σ > 1 settings (read
  at grid.fixed_loops only) use grid.condition_train_mode when it is set."""
  g = config.grid
  return g.condition_train_mode if float(kappa) != 1.0 else g.train_mode


def point_id(p: dict) -> str:
  """The point's name: its file is points/<id>.json in the workdir."""
  base = f"{p['kind']}_d{p['d']}_n{p['n']}_kappa{p['kappa']:g}"
  base += (f"_noise{p['noise']:g}" if p.get("noise", 0.0) else "") + f"_{p['method']}"
  return base + (f"_T{p['loops'][0]}" if p["method"] == "trained" else "")


def experiment_config(config, kind, d, n, kappa, loops) -> ml_collections.ConfigDict:
  """The training config of one trained point: the experiment template at (kind, d, n, κ, T)."""
  exp = copy.deepcopy(config.experiment)
  with exp.unlocked():
    exp.task.kind, exp.task.d, exp.task.n_context = kind, int(d), int(n)
    exp.task.condition_number = float(kappa)
    exp.model.loops = int(loops)
    exp.eval.seed = int(config.grid.eval_seed)
    if train_mode_of(config, kappa) == "window":
      exp.linear.loss_loops = int(loops)   # every loop is read out, so every loop is trained
      exp.linear.loss_normalization = "gd"
  return exp


def fingerprint(config, p: dict) -> str:
  """A hash of everything a point's numbers depend on (a changed setting invalidates it)."""
  g = config.grid
  parts = {"point": p, "seeds": list(g.seeds), "eval": [g.eval_prompts, g.eval_seed],
           "task": {k: v for k, v in config.experiment.task.to_dict().items()},
           "records": RECORD_VERSION}
  if p["method"] == "construction":  # the step rules and the ladder are part of a construction point
    parts["ladder"] = dict(ladder.spec(), fit_loops=int(g.fixed_loops), rungs=list(g.ladder),
                           max_loops=max(int(t) for t in g.trained_loops))
    parts["rules"] = dict(step_rules.spec(), scan=g.scan_prompts, validation=g.validation_prompts,
                          shoulder=g.step_shoulder, epsilon=g.epsilon,
                          tuned=int(p["d"]) <= int(g.tuned_max_d))
  if p["method"] == "trained":
    exp = experiment_config(config, p["kind"], p["d"], p["n"], p["kappa"], p["loops"][0])
    train = exp.train.to_dict()
    if train["curriculum_start"] == 0:  # fields that change nothing must not invalidate a point
      train.pop("curriculum_every"), train.pop("curriculum_increment")
    parts.update(model=exp.model.to_dict(), train=train, linear=exp.linear.to_dict(),
                 mode=train_mode_of(config, p["kappa"]))
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_config(config, kind, d, n, kappa, noise=0.0) -> ml_collections.ConfigDict:
  """The task config of one setting: the experiment's task at (kind, d, n, κ, σ)."""
  t = copy.deepcopy(config.experiment.task)
  with t.unlocked():
    t.kind, t.d, t.n_context, t.condition_number = kind, int(d), int(n), float(kappa)
    t.noise_std = float(noise)
  return t
