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
from loopicl.experiments.reproduce import ladder
from loopicl.linear import tasks

TRAIN_MODES = ("per_loops", "window")


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
  exp = experiment_config(config, "linear_regression", g.ds[0], g.ds[0], 1.0, max(g.trained_loops))
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
  """The point's name: its file is points/<id>.json in the workdir."""
  base = f"{p['kind']}_d{p['d']}_n{p['n']}_kappa{p['kappa']:g}_{p['method']}"
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
      exp.train.loss_loops = int(loops)   # every loop is read out, so every loop is trained
      exp.train.loss_normalization = "gd"
  return exp


def fingerprint(config, p: dict) -> str:
  """A hash of everything a point's numbers depend on (a changed setting invalidates it)."""
  g = config.grid
  parts = {"point": p, "seeds": list(g.seeds), "eval": [g.eval_prompts, g.eval_seed],
           "task": {k: v for k, v in config.experiment.task.to_dict().items()}}
  if p["method"] == "construction":  # the ladder's rungs are part of a construction point
    parts["ladder"] = dict(ladder.spec(), fit_loops=int(g.fixed_loops))
  if p["method"] == "trained":
    exp = experiment_config(config, p["kind"], p["d"], p["n"], p["kappa"], p["loops"][0])
    train = exp.train.to_dict()
    if train["curriculum_start"] == 0:  # fields that change nothing must not invalidate a point
      train.pop("curriculum_every"), train.pop("curriculum_increment")
    parts.update(model=exp.model.to_dict(), train=train, mode=train_mode_of(config, p["kappa"]))
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_config(config, kind, d, n, kappa) -> ml_collections.ConfigDict:
  """The task config of one setting: the experiment's task at (kind, d, n, κ)."""
  t = copy.deepcopy(config.experiment.task)
  with t.unlocked():
    t.kind, t.d, t.n_context, t.condition_number = kind, int(d), int(n), float(kappa)
  return t
