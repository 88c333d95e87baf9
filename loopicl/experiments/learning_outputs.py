"""The learning experiment's outputs: learning.csv, summary.md and the extrapolation figure.

One row per (setting, seed): the trained model's error at its trained T next to GD's and PGD's on
the same prompts (step tuned on other prompts) — the mean over prompts of the single-query error
(`*_mean`: one random query per prompt, an unbiased estimate of the mean expected error), its
median (`*_single_query_median`), and the mean, median and q90 over prompts of each prompt's
expected error over the query E_q (`*_expected_mean`, `*_expected_median`, `*_expected_q90`;
`linear.expected_error`) — the ratios trained / the better of the two for each statistic
(`ratio_*`; the targets are `ratio_mean` and `ratio_expected_median` ≤ grid.target), the same
against the hindsight step (`*_hindsight`: the step best on the test prompts themselves),
divergence, and the loop extrapolation: the mean error at 2T and 4T over the one at T (and the
median E_q at 4T over T), and a verdict — `falls` (4T below half of T), `holds` (within 2×),
`blows up` (above 2×, or non-finite prompts).
"""
from __future__ import annotations

import math
import os

import numpy as np

from loopicl.experiments.reproduce import outputs
from loopicl.linear import family

# Per method (trained, gd, pgd) and in ratios: (column suffix, the point's per-loop key).
STATISTICS = (("mean", "error"), ("single_query_median", "error_median"),
              ("expected_mean", "expected_error"), ("expected_median", "expected_error_median"),
              ("expected_q90", "expected_error_q90"))
COLUMNS = ("setting", "d", "n", "n_over_d", "condition_number", "rotate", "loops", "seed",
           *(f"{who}_{stat}" for who in ("trained", "gd", "pgd") for stat, _ in STATISTICS),
           *(f"ratio_{stat}" for stat, _ in STATISTICS), "gd_step", "pgd_scale", "gd_mean_hindsight",
           "pgd_mean_hindsight", "ratio_mean_hindsight", "ratio_single_query_median_hindsight",
           "ratio_expected_median_hindsight", "diverged_at_step", "skipped_steps",
           "nonfinite_at_T", "mean_2T_over_T", "mean_4T_over_T", "expected_median_4T_over_T",
           "extrapolation", "offblock_fraction", "precond_cos_sigma_inv", "train_wall_s")


def _ratio(a, b):
  return a / b if b > 0 and math.isfinite(a) else math.inf


verdict = family.extrapolation_verdict  # falls / holds / blows up: the training evaluator's rule


def rows(points: dict) -> list[dict]:
  out = []
  for pid, data in points.items():
    p = data["setting"]
    T = p["loops"]
    for seed, s in data["seeds"].items():
      b = s["baselines"]
      mean, med = s["error"], s["expected_error_median"]
      best = lambda key, suffix="": min(b["gd" + suffix][key][T - 1], b["pgd" + suffix][key][T - 1])
      L = len(mean)
      row = {"setting": pid, "d": p["d"], "n": p["n"], "n_over_d": p["n_over_d"],
             "condition_number": p["condition_number"], "rotate": p["rotate"], "loops": T,
             "seed": int(seed)}
      for stat, key in STATISTICS:
        row.update({f"trained_{stat}": s[key][T - 1], f"gd_{stat}": b["gd"][key][T - 1],
                    f"pgd_{stat}": b["pgd"][key][T - 1],
                    f"ratio_{stat}": _ratio(s[key][T - 1], best(key))})
      out.append({
          **row,
          "gd_step": b["gd"]["step"], "pgd_scale": b["pgd"]["step"],
          "gd_mean_hindsight": b["gd_hindsight"]["error"][T - 1],
          "pgd_mean_hindsight": b["pgd_hindsight"]["error"][T - 1],
          "ratio_mean_hindsight": _ratio(mean[T - 1], best("error", "_hindsight")),
          "ratio_single_query_median_hindsight": _ratio(s["error_median"][T - 1],
                                                        best("error_median", "_hindsight")),
          "ratio_expected_median_hindsight": _ratio(med[T - 1], best("expected_error_median",
                                                                     "_hindsight")),
          "diverged_at_step": s["diverged_at_step"], "skipped_steps": s.get("skipped_steps", 0),
          "nonfinite_at_T": s["nonfinite"][T - 1],
          "mean_2T_over_T": _ratio(mean[min(2 * T, L) - 1], mean[T - 1]),
          "mean_4T_over_T": _ratio(mean[L - 1], mean[T - 1]),
          "expected_median_4T_over_T": _ratio(med[L - 1], med[T - 1]),
          "extrapolation": verdict(mean[T - 1], mean[L - 1], max(s["nonfinite"][T - 1:])),
          "offblock_fraction": s["offblock_fraction"],
          "precond_cos_sigma_inv": s["precond_cos_sigma_inv"],
          "train_wall_s": data["train_wall_s"]})
  return out


def _fmt(x) -> str:
  if isinstance(x, float):
    if not math.isfinite(x):
      return "inf" if x > 0 else "nan"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
  return str(x)


def summary_markdown(config, table: list[dict]) -> str:
  target = float(config.grid.target)
  lines = ["# Learned from scratch: trained looped transformers against GD and PGD", "",
           f"{len(config.grid.seeds)} seeds × {config.grid.eval_prompts} held-out prompts per "
           "setting; GD (η) and PGD (c·Σ⁻¹) with the step best for the mean at T over "
           f"{config.grid.tune_prompts} other prompts, read on the same held-out prompts as the "
           "trained model.  mean: the mean over prompts of the single-query error (one random query "
           "per prompt); median E_q: the median over prompts of each prompt's expected error over "
           "the query (`*_expected_median` in learning.csv; the single-query medians, which mix the "
           "query's spread in, are its `*_single_query_median`).  ratio = trained / min(GD, PGD), "
           f"per seed (worst seed shown); target ≤ {target:g} for the mean and for the median E_q.  "
           "hindsight: the same ratios against the step best on the held-out prompts themselves (an "
           f"oracle).  Extrapolation: mean error at {config.grid.extrapolation}T over T.", "",
           "| setting | T | trained mean | GD mean | PGD mean | ratio mean (worst) | trained median E_q | "
           "GD median E_q | PGD median E_q | ratio median E_q (worst) | seeds ≤ target | hindsight: ratio mean, "
           "median E_q (worst); seeds ≤ target | diverged (skipped steps) | 4T/T mean (median E_q) | "
           "extrapolation | train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  by_setting: dict[str, list[dict]] = {}
  for r in table:
    by_setting.setdefault(r["setting"], []).append(r)
  for pid, rs in by_setting.items():
    med = lambda k: float(np.median([r[k] for r in rs]))
    ok = sum(r["ratio_mean"] <= target and r["ratio_expected_median"] <= target for r in rs)
    ok_h = sum(r["ratio_mean_hindsight"] <= target and r["ratio_expected_median_hindsight"] <= target
               for r in rs)
    worst = lambda k: _fmt(max(r[k] for r in rs))
    diverged = sum(r["diverged_at_step"] >= 0 for r in rs)
    skips = sum(r["skipped_steps"] for r in rs)
    verdicts = sorted({r["extrapolation"] for r in rs})
    lines.append(
        f"| {pid} | {rs[0]['loops']} | {_fmt(med('trained_mean'))} | {_fmt(med('gd_mean'))} | "
        f"{_fmt(med('pgd_mean'))} | {_fmt(max(r['ratio_mean'] for r in rs))} | "
        f"{_fmt(med('trained_expected_median'))} | {_fmt(med('gd_expected_median'))} | "
        f"{_fmt(med('pgd_expected_median'))} | {_fmt(max(r['ratio_expected_median'] for r in rs))} | "
        f"{ok}/{len(rs)} | "
        f"{worst('ratio_mean_hindsight')}, {worst('ratio_expected_median_hindsight')}; {ok_h}/{len(rs)} | "
        f"{diverged}/{len(rs)} ({skips}) | "
        f"{_fmt(med('mean_4T_over_T'))} ({_fmt(med('expected_median_4T_over_T'))}) | "
        f"{', '.join(verdicts)} | {rs[0]['train_wall_s']:.0f} |")
  lines += ["", "Errors are medians over seeds of each seed's statistic over prompts; "
            "query MSE, the T = 0 error is ≈ 1 (tr Σ·‖w‖²-scaled for κ_Σ > 1).", ""]
  return "\n".join(lines)


def write_csv(path: str, table: list[dict]) -> None:
  """learning.csv at full float precision (the docs' numbers are read from it)."""
  outputs.write_csv(path, COLUMNS, table, float_format=repr)


def figure(points: dict):
  """Error / e₀ against loops 1 … 4T per setting: every seed (thin), GD and PGD (dashed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ids = list(points)
  cols = min(4, len(ids))
  rows_ = math.ceil(len(ids) / cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), squeeze=False)
  for ax, pid in zip(axes.flat, ids):
    data = points[pid]
    T = data["setting"]["loops"]
    curves = []
    for seed, s in data["seeds"].items():
      e0 = s["error_at_zero"]
      t = np.arange(1, len(s["error"]) + 1)
      for key, ls in (("error", "-"), ("expected_error_median", ":")):
        curves.append(np.asarray(s[key], float) / e0)
        ax.semilogy(t, curves[-1], color="C0", lw=0.8, ls=ls, alpha=0.8)
    s = next(iter(data["seeds"].values()))
    for name, color in (("gd", "C1"), ("pgd", "C2")):
      curves.append(np.asarray(s["baselines"][name]["error"], float) / s["error_at_zero"])
      ax.semilogy(t, curves[-1], color=color, ls="--", lw=1, label=f"{name.upper()} (η tuned at T)")
    # A blown-up seed (1e300) must not flatten the rest: cap the axis at 1e3 × e₀.
    values = np.concatenate(curves)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
      ax.set_ylim(0.5 * values.min(), min(2 * values.max(), 1e3))
    ax.axvline(T, color="k", lw=0.6)
    ax.set_title(pid, fontsize=8)
    ax.set_xlabel("loop t")
  axes.flat[0].set_ylabel("error / e₀ (solid: mean, dotted: median E_q)")
  axes.flat[0].legend(fontsize=7)
  for ax in list(axes.flat)[len(ids):]:
    ax.axis("off")
  fig.tight_layout()
  return fig


def write(config, points: dict, workdir: str, *, figures: bool = True) -> list[dict]:
  table = rows(points)
  write_csv(os.path.join(workdir, "learning.csv"), table)
  with open(os.path.join(workdir, "summary.md.tmp"), "w") as f:
    f.write(summary_markdown(config, table))
  os.replace(os.path.join(workdir, "summary.md.tmp"), os.path.join(workdir, "summary.md"))
  if figures and points:
    from loopicl import runlog
    runlog.save_figure(figure(points), workdir, "extrapolation")
  return table
