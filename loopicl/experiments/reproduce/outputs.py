"""The grid's tables: results.csv and weights.csv rows from the point files, and summary.md.

results.csv has one row per setting × T × seed × method (`CSV_COLUMNS`): construction, trained
and the reference ladder of each construction point (`ladder.METHODS`); weights.csv one row per
trained model and seed, its weights against the construction (`WEIGHT_COLUMNS`).
`aggregate` groups results.csv rows over seeds (mean, min–max, diverged count), and feeds both
`summary_markdown` (the headline trained / construction table, every grid point, and the fitted
per-loop contraction of the construction against the theory rate) and the figures.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from loopicl import stats
from loopicl.experiments.reproduce import ladder
from loopicl.experiments.reproduce.grid import n_context, train_mode_of
from loopicl.linear import construction

CSV_COLUMNS = (
    "task_kind", "d", "n_context", "n_over_d", "condition_number", "loops", "seed", "method",
    "error", "kappa_hat", "theory_rate", "gd_step_size", "gd_error", "ratio_to_construction",
    "diverged", "diverged_at_step", "error_at_freeze", "nonfinite_prompts", "weight_distance",
    "offblock_fraction", "precond_cos_identity", "precond_cos_sigma_inv", "train_mode",
    "trained_loops", "train_steps", "point_wall_s", "error_at_zero",
)


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


def _ratio(a: float, b: float) -> float:
  return a / b if b != 0 else float("nan")


def _ladder_rows(key, r: dict, s: dict, pt: dict) -> list[dict]:
  """The ladder's rows at one (setting, T, seed) of a construction point: the construction row's
  columns where they mean the same (error, κ̂, theory rate, GD's error and the ratio to it,
  non-finite prompts, error at W = 0); the training and weight columns blank."""
  kind, d, n, kappa, T, seed = key
  rows = []
  for method in ladder.METHODS:
    rec = s.get("ladder", {}).get(method, {}).get(str(T))
    if rec is None:
      continue
    rows.append(dict(
        task_kind=kind, d=d, n_context=n, n_over_d=n / d, condition_number=kappa, loops=T,
        seed=seed, method=method, error=rec["error"], kappa_hat=s["kappa_hat"],
        theory_rate=float(construction.convergence_rate(s["kappa_hat"])), gd_step_size="",
        gd_error=r["error"], ratio_to_construction=_ratio(rec["error"], r["error"]), diverged=0,
        diverged_at_step=-1, error_at_freeze="", nonfinite_prompts=rec["nonfinite_prompts"],
        weight_distance="", offblock_fraction="", precond_cos_identity="",
        precond_cos_sigma_inv="", train_mode="", trained_loops="", train_steps=0,
        point_wall_s=pt["wall_s"], error_at_zero=s["error_at_zero"]))
  return rows


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
    rows += _ladder_rows((kind, d, n, kappa, T, seed), r, s, pt)
  for pt in data.values():
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


def write_csv(path: str, columns, rows) -> None:
  """Writes rows (dicts) atomically, floats to 6 significant digits."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
  os.replace(tmp, path)


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
      return float(stats.finite_mean(v)[0])
    out[key] = {"mean": mean_of("error"),
                "lo": float(errs[ok].min()) if ok.any() else float("nan"),
                "hi": float(errs[ok].max()) if ok.any() else float("nan"),
                "n": int(ok.sum()), "diverged": int(sum(int(r["diverged"]) for r in rs)),
                "seeds": len(rs), "kappa_hat": mean_of("kappa_hat"), "rate": mean_of("theory_rate"),
                "ratio": mean_of("ratio_to_construction"), "error_at_zero": mean_of("error_at_zero"),
                "weight_distance": mean_of("weight_distance"),
                "offblock_fraction": mean_of("offblock_fraction"),
                "precond_cos_identity": mean_of("precond_cos_identity"),
                "precond_cos_sigma_inv": mean_of("precond_cos_sigma_inv"),
                "nonfinite_prompts": int(sum(int(r["nonfinite_prompts"]) for r in rs))}
  return out


def _fmt(x) -> str:
  return "—" if x is None or not np.isfinite(x) else f"{x:.3g}"


HEADLINE_LOOPS = (1, 2, 5, 10, 20)


def headline_table(rows: list[dict], loops=HEADLINE_LOOPS) -> list[str]:
  """Markdown lines: trained vs construction at a few T, with the per-seed ratio range and the
  ladder's errors (the rungs present in rows) beside them."""
  agg = aggregate(rows)
  ratios = {}
  for r in rows:
    if r["method"] == "trained" and not int(r["diverged"]):
      key = (r["task_kind"], r["d"], r["n_context"], r["condition_number"], r["loops"])
      ratios.setdefault(key, []).append(float(r["ratio_to_construction"]))
  rungs = [m for m in ladder.METHODS if any(r["method"] == m for r in rows)]
  lines = ["## Headline: trained / construction at T ∈ {" + ", ".join(map(str, loops)) + "}", ""]
  if rungs:
    lines += [f"{ladder.SHORT[rungs[0]]} … {ladder.SHORT[rungs[-1]]}: the reference ladder on the "
              "same prompts, mean error over seeds (CG = conjugate gradients; Chebyshev on the "
              "setting's Marchenko–Pastur edges).", ""]
  lines += ["| task | d | n/d | κ_Σ | κ̂ (median) | T | construction | trained | "
            + "".join(f"{ladder.SHORT[m]} | " for m in rungs)
            + "trained / construction, seeds min–max | diverged |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(rungs) + "---|---|"]
  for kind, d, n, kap, method, T in sorted(agg):
    t = agg.get((kind, d, n, kap, "trained", T))
    if method != "construction" or T not in loops or t is None:
      continue
    c, rs = agg[(kind, d, n, kap, method, T)], ratios.get((kind, d, n, kap, T), [])
    span = f"{_fmt(min(rs))}–{_fmt(max(rs))}" if rs else "—"
    rung = "".join(f"{_fmt(agg.get((kind, d, n, kap, m, T), {}).get('mean'))} | " for m in rungs)
    lines.append(f"| {kind} | {d} | {n / d:g} | {kap:g} | {_fmt(c['kappa_hat'])} | {T} | {_fmt(c['mean'])} | "
                 f"{_fmt(t['mean'])} | {rung}{span} | {t['diverged']}/{t['seeds']} |")
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
  if any(r["method"] in ladder.METHODS for r in rows):
    lines += ["Reference ladder (methods cg, chebyshev, newton, whitened_gd in results.csv): "
              f"whitened GD's (pq, η) are fitted once per seed at T = {g.fixed_loops} on "
              f"{ladder.WHITENED_FIT_PROMPTS} scan prompts; Newton–Schulz is read by loop count "
              "(its step T is worth 2^T GD steps).", ""]
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
        slope = stats.log_linear_slope(Ts, e)
        factor = None if slope is None else math.exp(slope / (1 if kind == "vector_generation" else 2))
        c = agg[(kind, d, n, 1.0, "construction", Ts[0])]
        lines.append(f"| {kind} | {d} | {r:g} | {_fmt(c['kappa_hat'])} | {_fmt(c['rate'])} | {_fmt(factor)} |")
  return "\n".join(lines) + "\n"
