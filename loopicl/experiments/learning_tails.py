"""Which prompts decide a learning point's mean (scripts/learning_tails.py --tails, --population=N).

At n/d = 1.5 and T = 20 the error of a looped model is an extreme-value statistic: a prompt whose
loop map I − Σ̂Â has a spectral radius above 1 grows its error like radius^(2T), and a few such
prompts in many thousands carry the mean.  The table's mean over `grid.eval_prompts` (2048)
held-out prompts per seed then says as much about which prompts were drawn as about the model.
Two reports read the finished points (no training):

* `tail_report`: on each seed's own held-out prompts, how many prompts carry 90% of the mean,
  how many lie outside the stability region, how asymmetric Â is, and GD's / PGD's tuned step
  against the hindsight step.
* `population_report`: the same model, GD and PGD (at the table's tuned steps) on N fresh prompts
  drawn apart from every held-out and tuning prompt — the population mean and median ratios, the
  largest error, and on what fraction of disjoint eval_prompts-sized sets the mean ratio exceeds
  `grid.target` (how often the table's mean verdict would flip with another draw).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.experiments.learning import baseline_spectrum, experiment_config, load_points
from loopicl.experiments.reproduce import compute, step_rules
from loopicl.linear import spectral, tasks, weights
from loopicl.linear.model import loop_readouts

POPULATION_STREAM = 2 * 10**6  # fold_in index of the population prompts (tuning uses 10⁶)
CHUNK = 8192                   # prompts per float64 pass


def tail_report(config, workdir: str) -> list[str]:
  """Which prompts decide each finished seed's mean at T: one line per (setting, seed) with the
  number of held-out prompts that carry 90% of the mean, the mean and median, how many prompts
  have a spectral radius of I − Σ̂Â above 1 (outside the loop's stability region: their error
  grows with t), the asymmetry ||Â − Âᵀ||/||Â|| of the implied preconditioner, the eigenvalues
  of its symmetric part and how many prompts that part alone leaves outside (float64);
  then GD's and PGD's mean on the seed's prompts at the table's step (tuned on other prompts)
  against the hindsight step's: how much of an oracle the hindsight baseline is."""
  lines = []
  for pid, data in load_points(config, workdir).items():
    p = data["setting"]
    task, T = experiment_config(config, p).task, p["loops"]
    with jax.enable_x64(True):
      for seed, rec in data["seeds"].items():
        test, _ = compute.eval_prompts(task, config.grid.eval_seed, int(seed), int(config.grid.eval_prompts))
        P, Q, A = _model(rec, task)
        err = _error_at(P, Q, test, task, T)
        radius = _radius(test.X, A)
        sym = (A + A.T) / 2  # Â's symmetric part: the preconditioned-GD step it contains
        sym_eig = np.linalg.eigvalsh(sym)
        sym_unstable = int(np.sum(_radius(test.X, sym) > 1))
        top = np.sort(np.where(np.isfinite(err), err, np.inf))[::-1]
        share = np.cumsum(top) / np.sum(top)
        k90 = int(np.searchsorted(share, 0.9)) + 1
        lines.append(f"{pid} seed {seed}: {k90} of {len(err)} prompts carry 90% of the mean "
                     f"{np.mean(err):.3g} (median {np.median(err):.3g}); {int(np.sum(radius > 1))} "
                     f"with spectral radius of I − Σ̂Â > 1; ||Â − Âᵀ||/||Â|| = "
                     f"{np.linalg.norm(A - A.T) / np.linalg.norm(A):.2f}; symmetric part's eigenvalues "
                     f"{sym_eig[0]:.3g}–{sym_eig[-1]:.3g}, {sym_unstable} prompts outside with it alone")
        for name in ("gd", "pgd"):
          tuned, oracle = rec["baselines"][name], rec["baselines"][name + "_hindsight"]
          lines.append(f"{pid} seed {seed}: {name} with the step tuned on {config.grid.tune_prompts} "
                       f"other prompts ({tuned['step']:.3g}): mean {tuned['error'][T - 1]:.3g}, "
                       f"{tuned['error'][T - 1] / oracle['error'][T - 1]:.3f}x the hindsight "
                       f"step's ({oracle['step']:.3g})")
  return lines


def _model(rec: dict, task):
  """(P, Q, Â) of a point's seed record: the weights (float64 under x64) and Â as numpy."""
  P, Q = jnp.asarray(rec["P"]), jnp.asarray(rec["Q"])
  return P, Q, np.asarray(weights.implied_preconditioner(P, Q, int(task.d_out)))


def _error_at(P, Q, batch, task, T: int) -> np.ndarray:
  """The model's error per prompt after T loops: [prompts]."""
  out = loop_readouts(P, Q, batch.Z0, loops=T, d_out=int(task.d_out), n_queries=tasks.num_queries(task))
  return np.asarray(compute.per_prompt_error(out, batch, task.kind))[-1]


def _radius(X, A: np.ndarray) -> np.ndarray:
  """Spectral radius of I − Σ̂Â per prompt (X: [b, d, n]): > 1 is outside the stability region."""
  X = np.asarray(X)
  sigma_hat = X @ np.swapaxes(X, -1, -2) / X.shape[-1]
  return np.max(np.abs(np.linalg.eigvals(np.eye(X.shape[1]) - sigma_hat @ A)), axis=-1)


def population_report(config, workdir: str, prompts: int) -> list[str]:
  """Each finished seed, GD and PGD on `prompts` fresh prompts (float64): one line per seed."""
  g, lines = config.grid, []
  for pid, data in load_points(config, workdir).items():
    p = data["setting"]
    task, T = experiment_config(config, p).task, p["loops"]
    kind = step_rules.error_kind(task.kind)
    seeds = list(data["seeds"])
    errors = {s: [] for s in seeds}
    radius = {s: 0 for s in seeds}
    base = {"gd": [], "pgd": []}
    steps = {name: data["seeds"][seeds[0]]["baselines"][name]["step"] for name in base}
    with jax.enable_x64(True):
      models = {s: _model(data["seeds"][s], task) for s in seeds}
      key = jax.random.fold_in(jax.random.key(int(g.eval_seed)), POPULATION_STREAM)
      for c in range(-(-int(prompts) // CHUNK)):
        batch = tasks.sample(jax.random.fold_in(key, c), task, min(CHUNK, int(prompts) - c * CHUNK))
        for s, (P, Q, A) in models.items():
          errors[s].append(_error_at(P, Q, batch, task, T))
          radius[s] += int(np.sum(_radius(batch.X, A) > 1))
        for name in base:
          base[name].append(np.asarray(spectral.errors(
              baseline_spectrum(task, batch, name), steps[name], np.array([T]), kind=kind, max_loops=T))[-1])
    gd, pgd = (np.concatenate(base[name]) for name in ("gd", "pgd"))
    ref_mean, ref_median = min(gd.mean(), pgd.mean()), min(np.median(gd), np.median(pgd))
    lines.append(f"{pid}: {gd.size} fresh prompts, GD mean {gd.mean():.3g} (median {np.median(gd):.3g}), "
                 f"PGD mean {pgd.mean():.3g} (median {np.median(pgd):.3g}), at the table's steps")
    size = int(g.eval_prompts)
    sets = gd.size // size
    best = np.minimum(gd[:sets * size].reshape(sets, size).mean(1),
                      pgd[:sets * size].reshape(sets, size).mean(1))
    for s in seeds:
      e = np.concatenate(errors[s])
      flips = e[:sets * size].reshape(sets, size).mean(1) / best > float(g.target)  # [sets]
      lines.append(f"{pid} seed {s}: mean {e.mean() / ref_mean:.3g}x min(GD, PGD), median "
                   f"{np.median(e) / ref_median:.3g}x; largest error {e.max():.3g}; {radius[s]} prompts "
                   f"with spectral radius of I − Σ̂Â > 1; mean above {g.target:g}x on "
                   f"{int(np.sum(flips))} of {sets} disjoint sets of {size}")
  return lines
