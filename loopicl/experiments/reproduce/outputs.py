"""The grid's tables: results.csv and weights.csv rows from the point files, and summary.md.

results.csv has one row per setting × T × seed × method (`CSV_COLUMNS`): the five step rules of
each construction point (`step_rules.METHODS`), its reference ladder (`ladder.METHODS`) and the
trained models, each with its distribution over the test prompts: of the single-query error
(`error`, the mean; `single_query_error_median`, `_q90`, `_q99`, `single_query_frac_below_eps`,
`nonfinite`) and of each prompt's expected error over the query E_q (`expected_error`,
`expected_error_median`, `_q90`, `_q99`, `frac_expected_below_eps`; `linear.expected_error`);
weights.csv one row per trained model and seed, its
weights against the construction (`WEIGHT_COLUMNS`); n_required.csv the smallest n/d at which
a statistic reaches ε (`n_required_rows`: the mean of the single-query error, the median and q90
of E_q).  `aggregate` groups results.csv rows over seeds and
feeds summary.md (`summary`) and the figures.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from loopicl.experiments.reproduce.grid import n_context, train_mode_of
from loopicl.linear import construction, expected_error

CSV_COLUMNS = (
    "task_kind", "d", "n_context", "n_over_d", "condition_number", "noise_std", "loops", "seed",
    "method", "error", "single_query_error_median", "single_query_error_q90",
    "single_query_error_q99", "single_query_frac_below_eps", "expected_error",
    "expected_error_median", "expected_error_q90", "expected_error_q99", "frac_expected_below_eps",
    "epsilon", "nonfinite", "error_to_ls", "single_query_error_to_ls_median", "ls_error",
    "error_at_zero", "kappa_hat",
    "theory_rate", "step_size", "step_optimum", "step_validation", "bound_violations", "gd_error",
    "ratio_to_construction", "diverged", "diverged_at_step", "error_at_freeze", "weight_distance",
    "offblock_fraction", "precond_cos_identity", "precond_cos_sigma_inv", "train_mode",
    "trained_loops", "train_steps", "point_wall_s",
)
DISTRIBUTION = expected_error.RECORD_KEYS  # a record's keys are these columns' names
RECORD_COLUMNS = {"to_ls_mean": "error_to_ls", "to_ls_median": "single_query_error_to_ls_median",
                  "step_size": "step_size", "step_optimum": "step_optimum",
                  "step_validation": "step_validation", "bound_violations": "bound_violations"}


def _construction_index(data: dict) -> dict:
  """(kind, d, n, κ, σ, T, seed) -> (the `construction` rule's record at T, its seed's record)."""
  out = {}
  for pt in data.values():
    p = pt["point"]
    if p["method"] == "construction":
      for seed, s in pt["seeds"].items():
        for T in p["loops"]:  # no tuned rule (d > grid.tuned_max_d): GD's error is NaN
          r = s["methods"].get("construction", {}).get(str(T), {"error": float("nan")})
          out[(p["kind"], p["d"], p["n"], p["kappa"], p.get("noise", 0.0), int(T), int(seed))] = (r, s)
  return out


def _ratio(a: float, b: float) -> float:
  return a / b if b != 0 and math.isfinite(b) else float("nan")


def _row(config, p: dict, pt: dict, T: int, seed: int, method: str, rec: dict, ref) -> dict:
  """One results.csv row: the setting, the record's distribution and columns, the seed's
  construction-level columns (κ̂, error at W = 0, least squares' error) and GD's error at T."""
  seed_rec = ref[1] if ref else {}
  row = {c: "" for c in CSV_COLUMNS}
  kappa_hat = seed_rec.get("kappa_hat", float("nan"))
  row.update(task_kind=p["kind"], d=p["d"], n_context=p["n"], n_over_d=p["n"] / p["d"],
             condition_number=p["kappa"], noise_std=p.get("noise", 0.0), loops=T, seed=seed,
             method=method, epsilon=float(config.grid.epsilon), kappa_hat=kappa_hat,
             theory_rate=float(construction.convergence_rate(kappa_hat)),
             ls_error=seed_rec.get("ls_error", ""), error_at_zero=seed_rec.get("error_at_zero", ""),
             gd_error=ref[0]["error"] if ref else float("nan"), diverged=0, diverged_at_step=-1,
             train_steps=0, point_wall_s=pt["wall_s"])
  row.update({k: rec[k] for k in DISTRIBUTION})
  row.update({col: rec[k] for k, col in RECORD_COLUMNS.items() if k in rec})
  row["ratio_to_construction"] = _ratio(rec["error"], row["gd_error"])
  return row


def rows_from_points(config, data: dict) -> list[dict]:
  """The results.csv rows (dicts with CSV_COLUMNS) of every finished point."""
  rows = []
  constructions = _construction_index(data)
  for pt in data.values():
    p = pt["point"]
    if p["method"] == "construction":
      for seed, s in pt["seeds"].items():
        for method, recs in list(s["methods"].items()) + list(s.get("ladder", {}).items()):
          for T, rec in recs.items():
            key = (p["kind"], p["d"], p["n"], p["kappa"], p.get("noise", 0.0), int(T), int(seed))
            rows.append(_row(config, p, pt, int(T), int(seed), method, rec, constructions[key]))
      continue
    if p.get("role") == "weights":
      continue
    for seed, s in pt["seeds"].items():
      diverged = s["diverged_at_step"] >= 0
      for T in p["read_loops"]:
        ref = constructions.get((p["kind"], p["d"], p["n"], p["kappa"], p.get("noise", 0.0), T, int(seed)))
        row = _row(config, p, pt, T, int(seed), "trained", s["loops"][str(T)], ref)
        err = s["error_per_loop"][T - 1]
        row.update(
            # A diverged seed keeps its last good state; its error is shown apart, never as `error`.
            error=float("nan") if diverged else err,
            expected_error=float("nan") if diverged else row["expected_error"],
            ratio_to_construction=float("nan") if diverged else _ratio(err, row["gd_error"]),
            diverged=int(diverged), diverged_at_step=s["diverged_at_step"],
            error_at_freeze=err if diverged else "", train_mode=train_mode_of(config, p["kappa"]),
            trained_loops=p["loops"][0], train_steps=pt["train_steps"],
            **{k: s[k] for k in ("weight_distance", "offblock_fraction", "precond_cos_identity",
                                 "precond_cos_sigma_inv")})
        rows.append(row)
  order = lambda r: (r["task_kind"], r["d"], r["condition_number"], r["noise_std"], r["n_context"],
                     r["method"], r["loops"], r["seed"])
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
      ref = constructions.get((p["kind"], p["d"], p["n"], p["kappa"], p.get("noise", 0.0), T, int(seed)))
      rows.append(dict(
          task_kind=p["kind"], d=p["d"], n_context=p["n"], n_over_d=p["n"] / p["d"],
          condition_number=p["kappa"], trained_loops=T, seed=int(seed),
          train_mode=train_mode_of(config, p["kappa"]), diverged=int(diverged),
          error=float("nan") if diverged else s["error_per_loop"][T - 1],
          gd_error=ref[0]["error"] if ref else float("nan"),
          **{k: s[k] for k in WEIGHT_COLUMNS[-4:]}))
  return sorted(rows, key=lambda r: (r["task_kind"], r["d"], r["condition_number"], r["n_context"],
                                     r["trained_loops"], r["seed"]))


def write_csv(path: str, columns, rows, float_format=lambda v: f"{v:.6g}") -> None:
  """Writes rows (dicts) atomically, floats by float_format (6 significant digits; `repr`: all)."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (float_format(v) if isinstance(v, float) else v) for k, v in r.items()})
  os.replace(tmp, path)


AGGREGATED = {"mean": "error", "expected_mean": "expected_error",
              "expected_median": "expected_error_median", "expected_q90": "expected_error_q90",
              "expected_q99": "expected_error_q99", "frac_expected_below_eps": "frac_expected_below_eps",
              "single_query_median": "single_query_error_median",
              "single_query_q90": "single_query_error_q90", "single_query_q99": "single_query_error_q99",
              "single_query_frac_below_eps": "single_query_frac_below_eps", "to_ls": "error_to_ls",
              "to_ls_median": "single_query_error_to_ls_median", "ls_error": "ls_error",
              "step_validation": "step_validation", "kappa_hat": "kappa_hat", "rate": "theory_rate",
              "ratio": "ratio_to_construction", "error_at_zero": "error_at_zero",
              "weight_distance": "weight_distance", "offblock_fraction": "offblock_fraction",
              "precond_cos_identity": "precond_cos_identity",
              "precond_cos_sigma_inv": "precond_cos_sigma_inv"}


def _number(v) -> float:
  return float(v) if v not in ("", None) else float("nan")


def _finite_mean(values: list[float]) -> float:
  """`stats.finite_mean` of a handful of Python floats, in Python: the grid aggregates ~10⁵ such
  groups after every point, where numpy's per-call overhead dominated (seconds per rebuild)."""
  finite = [v for v in values if math.isfinite(v)]
  return math.fsum(finite) / len(finite) if finite else float("nan")


def aggregate(rows: list[dict], noise: float = 0.0) -> dict:
  """(kind, d, n, κ, method, T) -> {mean, expected_median, …, lo, hi, n, diverged, seeds, …} over the
  seeds, for the rows with noise_std = `noise`.

  Each statistic (AGGREGATED: key -> results.csv column) is the mean over the seeds with a finite
  value of that seed's statistic over its prompts (so `expected_median` is the seeds' mean median
  of E_q, `single_query_median` that of the single-query error); lo/hi
  are the min and max of `error` over the seeds that did not diverge, `diverged` counts the
  others, `nonfinite` sums the non-finite prompts, `bound_violations` sums the bound's.
  """
  groups = {}
  for r in rows:
    if _number(r["noise_std"]) != float(noise):
      continue
    key = (r["task_kind"], int(r["d"]), int(r["n_context"]), float(r["condition_number"]),
           r["method"], int(r["loops"]))
    groups.setdefault(key, []).append(r)
  out = {}
  for key, rs in groups.items():
    errs = np.array([_number(r["error"]) for r in rs], np.float64)
    ok = np.isfinite(errs)
    agg = {name: _finite_mean([_number(r[col]) for r in rs]) for name, col in AGGREGATED.items()}
    agg.update(lo=float(errs[ok].min()) if ok.any() else float("nan"),
               hi=float(errs[ok].max()) if ok.any() else float("nan"),
               n=int(ok.sum()), diverged=int(sum(int(r["diverged"]) for r in rs)), seeds=len(rs),
               nonfinite=int(sum(int(r["nonfinite"]) for r in rs)),
               bound_violations=int(sum(int(r["bound_violations"] or 0) for r in rs)),
               epsilon=_number(rs[0]["epsilon"]))
    out[key] = agg
  return out


N_REQUIRED_COLUMNS = ("task_kind", "d", "condition_number", "noise_std", "loops", "method",
                      "statistic", "epsilon", "n_over_d_required")
# The mean of the single-query error (an unbiased estimate of the mean E_q, as before), and the
# median and q90 over prompts of E_q, each prompt's expected error (`aggregate`'s keys).
N_REQUIRED_STATISTICS = ("mean", "expected_median", "expected_q90")


def n_required_rows(config, rows: list[dict]) -> list[dict]:
  """n_required.csv: per (kind, d, κ_Σ, σ, T, method, statistic), the smallest n/d of the grid
  from which on (at it and at every larger n/d of the grid) the statistic over seeds is
  ≤ ε·(error at W = 0); inf where no n/d reaches it.  statistic: `N_REQUIRED_STATISTICS`."""
  g, out = config.grid, []
  noises = sorted({_number(r["noise_std"]) for r in rows})
  for noise in noises:
    agg = aggregate(rows, noise)
    for kind, d, kappa, method, T in sorted({(k[0], k[1], k[3], k[4], k[5]) for k in agg}):
      ratios = sorted(float(r) for r in g.n_over_d if (kind, d, n_context(d, r), kappa, method, T) in agg)
      if len(ratios) < 2:
        continue  # one n/d (e.g. a trained κ_Σ > 1 setting) says nothing about the n needed
      for statistic in N_REQUIRED_STATISTICS:
        reached = [agg[(kind, d, n_context(d, r), kappa, method, T)][statistic]
                   <= float(g.epsilon) * agg[(kind, d, n_context(d, r), kappa, method, T)]["error_at_zero"]
                   for r in ratios]
        need = float("inf")
        for i in reversed(range(len(ratios))):
          if not reached[i]:
            break
          need = ratios[i]
        out.append(dict(task_kind=kind, d=d, condition_number=kappa, noise_std=noise, loops=T,
                        method=method, statistic=statistic, epsilon=float(g.epsilon),
                        n_over_d_required=need))
  return out
