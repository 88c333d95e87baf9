"""The GD construction under five step rules, in closed form, on one setting's prompts (float64).

The paper's claim is about the *typical* prompt: with η matched to the prompt's own κ̂, T steps
reach error ρ(κ̂)^{2T} and κ̂ is bounded with high probability once n = O(d).  A single step
tuned for the *mean* over prompts — the population baseline of earlier analyses — is decided by
the rare prompts with a large λ_max(Σ̂).  So a construction point scores five rules on the same
test prompts (`linear.spectral`: T steps in closed form, any T up to 200 at the cost of one):

  * `construction`: one constant η per T, tuned for the mean on `grid.scan_prompts` prompts and
    stepped off the stability cliff by the shoulder rule (`spectral.tune_constant_step`); each
    seed's `step_validation` is its mean on a separate set of `grid.validation_prompts` prompts
    over that set's own optimum (≤ 1.2 is what the rule promises);
  * `construction_safe`: η = 1/λ₊, λ₊ = λ_max(Σ)(1 + √(d/n))² the Marchenko–Pastur edge — one
    fixed step that is safe with high probability;
  * `construction_mp`: η = 2/(λ₋ + λ₊), the Marchenko–Pastur centre — the step that is optimal
    for the typical prompt, held fixed: the prompts with λ_max(Σ̂) > 2/η (a fixed fraction of
    them, ~8% at n = 2d) diverge, so its mean explodes with T while its median falls;
  * `construction_oracle`: each prompt's η_i = 2/(λ_max(Σ̂_i) + λ_min(Σ̂_i)), whose contraction
    is the bound's ρ(κ̂_i); its `bound_violations` count the prompts × T whose distance to least
    squares exceeds `spectral.oracle_bound` (expected: none);
  * `pgd`: A = c·Σ⁻¹, c tuned like `construction` (plain GD on the whitened prompts).

Each method's record per T is `expected_error.statistics` of its per-prompt errors: the single-query
error's distribution over the prompts (`error`: mean over the finite prompts; median, q90, q99,
fraction ≤ ε·(error at W = 0), non-finite count, named `single_query_*`) and that of each
prompt's expected error over the query E_q (`expected_error*`, `frac_expected_below_eps`;
`linear.expected_error`: in closed form per T, like the error; for vector generation the error
has no random query and E_q is the error itself), plus its distance to least squares
(`to_ls_mean`, `to_ls_median`, single-query) — with label noise, the optimisation error the
claim is about, apart from least squares' own error (`ls_error`).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopicl import stats
from loopicl.linear import algorithms, expected_error, spectral, tasks

METHODS = ("construction", "construction_safe", "construction_mp", "construction_oracle", "pgd")
TUNED = ("construction", "pgd")
LABELS = {"construction": "GD, one tuned η (mean, shoulder rule)",
          "construction_safe": "GD, η = 1/λ₊ (MP edge)",
          "construction_mp": "GD, η = 2/(λ₋+λ₊) (MP centre, fixed)",
          "construction_oracle": "GD, per-prompt η_i = 2/(λ_max+λ_min)",
          "pgd": "preconditioned GD, c·Σ⁻¹ (tuned c)"}
BOUND_RTOL = 1e-9  # float64 slack in the bound check (the bound is an inequality, not a fit)


def spec() -> dict:
  """What a point's step-rule numbers depend on beyond the grid fields (its fingerprint)."""
  return {"methods": list(METHODS), "shoulder_default": spectral.SHOULDER, "search": "zoom 1e-3",
          "statistics": "single-query and expected error (E_q)"}


def error_kind(kind: str) -> str:
  return "relative" if kind == "vector_generation" else "mse"


def whitening(task) -> np.ndarray | None:
  """Σ^{-1/2} for preconditioned GD, or None when Σ = I (then c·Σ⁻¹ is plain GD)."""
  sigma = tasks.covariance(task)
  if np.allclose(sigma, np.eye(len(sigma))):
    return None
  lam, U = np.linalg.eigh(sigma)
  return (U / np.sqrt(lam)) @ U.T


@functools.lru_cache(maxsize=8)
def _chunk_spectra(task_json: str, size: int):
  """The compiled draw + decomposition of one chunk of prompts (reused by every chunk and set)."""
  task = ml_collections.ConfigDict(json.loads(task_json))
  kind, S = error_kind(task.kind), whitening(task)
  draw = jax.jit(lambda key: tasks.sample(key, task, size))

  def one(key):
    b = draw(key)
    tgt = b.W_star if kind == "relative" else b.targets
    out = {"gd": spectral.decompose(b.X, b.Y, b.X_query, tgt, kind=kind)}
    if S is not None:
      # A second decomposition in its own program, not beside the first in one: two batched
      # eigh in one XLA CPU program deadlocked the 2-thread pool (measured, κ_Σ = 10).
      out["pgd"] = spectral.decompose(b.X, b.Y, b.X_query, tgt, kind=kind, whitening=S)
    return out
  return one


def spectra(task, key, num_prompts: int, *, chunk: int = 8192) -> dict:
  """{"gd": Spectral, "pgd": Spectral} of `num_prompts` fresh prompts, drawn in chunks so that
  only one chunk's raw prompts are ever in memory ("pgd" is "gd" when Σ = I).  Call under x64."""
  task_json = json.dumps(task.to_dict(), sort_keys=True)
  parts = []
  for i, start in enumerate(range(0, num_prompts, chunk)):
    size = min(chunk, num_prompts - start)
    parts.append(_chunk_spectra(task_json, size)(jax.random.fold_in(key, i)))
  out = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  out.setdefault("pgd", out["gd"])
  return out


def safe_step(task) -> float:
  """1/λ₊ with λ₊ = λ_max(Σ)·(1 + √(d/n))², the Marchenko–Pastur upper edge."""
  lam_max = float(np.max(tasks.covariance_spectrum(task)))
  return 1.0 / (lam_max * (1.0 + np.sqrt(int(task.d) / int(task.n_context))) ** 2)


def tune(task, scan: dict, validation: dict, loops, shoulder: float) -> dict:
  """{method: {"step": η_rule [L], "optimum": η* [L], "validation": ratio [L]}} for the tuned
  rules: the step from the scan spectra, validated on the validation spectra (its mean there
  over the validation set's own optimum, found by the same search)."""
  kind, out = error_kind(task.kind), {}
  for method, key in (("construction", "gd"), ("pgd", "pgd")):
    if key == "pgd" and scan["pgd"] is scan["gd"]:  # Σ = I: c·Σ⁻¹ is plain GD, the same search
      out[method] = out["construction"]
      continue
    rule, star, _ = spectral.tune_constant_step(scan[key], loops, kind=kind, shoulder=shoulder)
    _, _, best = spectral.tune_constant_step(validation[key], loops, kind=kind, shoulder=None)
    at_rule = np.asarray(spectral.mean_errors(validation[key], rule, np.asarray(loops), kind=kind,
                                              max_loops=max(loops)))
    out[method] = {"step": rule, "optimum": star, "validation": at_rule / best}
  return out


def _records(err, expected, to_ls, loops, threshold, extra: dict) -> dict:
  """{str(T): record} from per-prompt single-query errors, expected errors E_q and distances to
  least squares [L, batch]."""
  dist = expected_error.statistics(err, expected, threshold)
  ls = stats.prompt_distribution(np.asarray(to_ls), threshold)
  out = {}
  for j, T in enumerate(loops):
    rec = {k: float(v[j]) if k != "nonfinite" else int(v[j]) for k, v in dist.items()}
    rec.update(to_ls_mean=float(ls["error"][j]), to_ls_median=float(ls["error_median"][j]),
               **{k: (v[j] if np.ndim(v) else v) for k, v in extra.items()})
    out[str(T)] = rec
  return out


def seed_records(task, test, tuned: dict | None, loops, epsilon: float) -> dict:
  """The five rules (the two tuned ones only when `tuned` is given) on one seed's test prompts
  (a `tasks.Batch`, float64):
  ({method: {str(T): record}}, {"ls_error", "ls_error_median", "error_at_zero", "threshold"})."""
  kind = error_kind(task.kind)
  tgt = test.W_star if kind == "relative" else test.targets
  sp = spectral.decompose(test.X, test.Y, test.X_query, tgt, kind=kind)
  S = whitening(task)
  sp_pgd = sp if S is None else spectral.decompose(test.X, test.Y, test.X_query, tgt, kind=kind,
                                                   whitening=S)
  # E_q in closed form: GD's read-out at the columns of Σ^{1/2} (`expected_error`); for vector
  # generation the weight error has no random query and E_q is the error itself (None below).
  sigma = expected_error.query_covariance(task)
  sq = expected_error.query_decomposition(test, sigma) if kind == "mse" else None
  sq_pgd = (sq if S is None or sq is None
            else expected_error.query_decomposition(test, sigma, whitening=S))
  zero = np.asarray(spectral.errors(sp, 0.0, [1], kind=kind)[0])      # η = 0: W stays 0
  e0 = float(np.mean(zero))
  threshold = epsilon * e0
  Ts = np.asarray(loops)
  out = {}

  def run(method, s, q, step, extra):
    err = spectral.errors(s, step, Ts, kind=kind, max_loops=max(loops))
    gap = spectral.distance_to_least_squares(s, step, Ts, kind=kind)
    expected = err if q is None else expected_error.spectral_expected_errors(q, step, Ts,
                                                                             max_loops=max(loops))
    out[method] = _records(err, expected, gap, loops, threshold, extra)
    return gap

  for method, s, q in (("construction", sp, sq), ("pgd", sp_pgd, sq_pgd)) if tuned else ():
    t = tuned[method]
    run(method, s, q, jnp.asarray(t["step"])[:, None], {"step_size": t["step"],
                                                        "step_optimum": t["optimum"],
                                                        "step_validation": t["validation"]})
  eta = safe_step(task)
  run("construction_safe", sp, sq, eta, {"step_size": eta})
  lo, hi = algorithms.marchenko_pastur_edges(task)
  run("construction_mp", sp, sq, 2.0 / (lo + hi), {"step_size": 2.0 / (lo + hi)})
  oracle = spectral.oracle_step(sp)
  gap = run("construction_oracle", sp, sq, oracle, {"step_size": float(np.median(np.asarray(oracle)))})
  bound = np.asarray(spectral.oracle_bound(sp, Ts, kind=kind))
  violations = np.sum(np.asarray(gap) > bound * (1 + BOUND_RTOL) + 1e-300, axis=-1)
  for j, T in enumerate(loops):
    out["construction_oracle"][str(T)]["bound_violations"] = int(violations[j])
  ls = np.asarray(spectral.least_squares_error(sp, kind=kind))
  return out, {"ls_error": float(np.mean(ls)), "ls_error_median": float(np.median(ls)),
               "error_at_zero": e0, "threshold": threshold}
