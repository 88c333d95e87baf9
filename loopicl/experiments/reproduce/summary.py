"""summary.md of the reproduction grid: the claim per step rule, n required, the bound, the rest.

Sections, each from results.csv rows through `outputs.aggregate` (statistics averaged over seeds):
  1. the step rules at a few T: mean error and median E_q (each prompt's expected error over the
     query) of each rule and of the trained model, with the single-query median beside them;
  2. n required: the smallest n/d at which a statistic reaches ε (n_required.csv) against T;
  3. the oracle step's per-prompt bound (violations, expected none) and the tuned steps'
     validation on a separate prompt set;
  4. label noise: distance to least squares (the optimisation error) beside least squares' own
     error and its closed form σ²·d/(n − d − 1);
  5. trained vs the construction (headline), with the reference ladder; error vs κ_Σ divided by
     the error at T = 0; the per-loop contraction against the theory rate.
"""
from __future__ import annotations

import math

import numpy as np

from loopicl import stats
from loopicl.experiments.reproduce import ladder, step_rules
from loopicl.experiments.reproduce.grid import n_context, train_mode_of
from loopicl.experiments.reproduce.outputs import aggregate, n_required_rows

SHOWN_LOOPS = (1, 5, 10, 20, 50, 100, 200)
HEADLINE_LOOPS = (1, 2, 5, 10, 20)


def _fmt(x) -> str:
  return "—" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _rule_methods(rows) -> list[str]:
  present = {r["method"] for r in rows}
  return [m for m in step_rules.METHODS + ("trained",) if m in present]


def step_rule_table(config, rows, noise: float = 0.0, agg=None) -> list[str]:
  """Mean error / median E_q / single-query median of every step rule (and trained) at
  SHOWN_LOOPS, every κ_Σ = 1 setting."""
  agg, methods = agg if agg is not None else aggregate(rows, noise), _rule_methods(rows)
  loops = [T for T in SHOWN_LOOPS if T in config.grid.loops]
  lines = ["| task | d | n/d | κ̂ (median) | T | " + " | ".join(f"{m} mean / E_q median / 1-query median"
                                                              for m in methods) + " |",
           "|---|---|---|---|---|" + "---|" * len(methods)]
  for kind, d, n, kap, method, T in sorted(agg):
    if method != "construction" or kap != 1.0 or T not in loops:
      continue
    cells = []
    for m in methods:
      a = agg.get((kind, d, n, kap, m, T))
      cells.append("—" if a is None else
                   f"{_fmt(a['mean'])} / {_fmt(a['expected_median'])} / {_fmt(a['single_query_median'])}")
    lines.append(f"| {kind} | {d} | {n / d:g} | {_fmt(agg[(kind, d, n, kap, method, T)]['kappa_hat'])} "
                 f"| {T} | " + " | ".join(cells) + " |")
  return lines


def n_required_table(config, rows) -> list[str]:
  """n_required.csv as a table: one line per (task, d, κ_Σ, method, statistic), T across."""
  req = [r for r in n_required_rows(config, rows) if r["noise_std"] == 0.0]
  loops = sorted({r["loops"] for r in req})
  shown = [T for T in loops if T in SHOWN_LOOPS or T == max(loops)]
  index = {(r["task_kind"], r["d"], r["condition_number"], r["method"], r["statistic"], r["loops"]):
           r["n_over_d_required"] for r in req}
  lines = ["| task | d | κ_Σ | method | statistic | " + " | ".join(f"T={T}" for T in shown) + " |",
           "|---|---|---|---|---|" + "---|" * len(shown)]
  for kind, d, kap, method, statistic in sorted({k[:5] for k in index}, key=lambda k: (
      k[0], k[2], k[3], k[4], k[1])):
    cells = [index.get((kind, d, kap, method, statistic, T)) for T in shown]
    lines.append(f"| {kind} | {d} | {kap:g} | {method} | {statistic} | "
                 + " | ".join("—" if c is None else ("never" if math.isinf(c) else f"{c:g}") for c in cells) + " |")
  return lines


def checks(rows) -> list[str]:
  """The oracle bound's violations and the tuned steps' validation ratios, over the whole grid."""
  oracle = [r for r in rows if r["method"] == "construction_oracle"]
  violations = sum(int(r["bound_violations"] or 0) for r in oracle)
  lines = [f"- Oracle-step bound ||(W_T − W_LS)X_q||² ≤ ρ(κ̂_i)^{{2T}}·||W_LS||²·||X_q||² (relative "
           f"weight error: ρ^T·||W_LS||/||W*||), prompt by prompt: **{violations} violations** in "
           f"{len(oracle)} (setting, T, seed) cells."]
  for method in step_rules.TUNED:
    v = np.array([float(r["step_validation"]) for r in rows if r["method"] == method
                  and r["step_validation"] not in ("", None)])
    if v.size:
      v = v[np.isfinite(v)]
      lines.append(f"- `{method}` step validation (mean on a separate prompt set at the tuned step / "
                   f"that set's own optimum): median {_fmt(np.median(v))}, max {_fmt(np.max(v))}, "
                   f"≤ 1.2 in {np.mean(v <= 1.2):.1%} of {v.size} cells.")
  return lines


def noise_table(config, rows) -> list[str]:
  """σ > 0: the construction's error split into distance to least squares and LS's own error."""
  lines, noises = [], sorted({float(r["noise_std"]) for r in rows} - {0.0})
  for sigma in noises:
    agg = aggregate(rows, sigma)
    lines += ["", f"σ = {sigma:g} (`construction`, mean over prompts and seeds):", "",
              "| task | d | n/d | T | error | distance to LS | LS error | σ²·d/(n−d−1) |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, d, n, kap, method, T in sorted(agg):
      if method == "construction" and T in SHOWN_LOOPS:
        a = agg[(kind, d, n, kap, method, T)]
        closed = sigma ** 2 * d / (n - d - 1) if kind == "linear_regression" and n > d + 1 else float("nan")
        lines.append(f"| {kind} | {d} | {n / d:g} | {T} | {_fmt(a['mean'])} | {_fmt(a['to_ls'])} | "
                     f"{_fmt(a['ls_error'])} | {_fmt(closed)} |")
  return lines


def headline_table(rows: list[dict], loops=HEADLINE_LOOPS, agg=None) -> list[str]:
  """Trained vs the tuned construction at a few T (mean and median E_q), the ladder beside them."""
  agg = agg if agg is not None else aggregate(rows)
  rungs = [m for m in ladder.METHODS if any(r["method"] == m for r in rows)]
  lines = ["| task | d | n/d | κ_Σ | T | construction mean / E_q median | pgd mean | trained mean / E_q median | "
           + "".join(f"{ladder.SHORT[m]} | " for m in rungs) + "trained / construction (means) | diverged |",
           "|---|---|---|---|---|---|---|---|" + "---|" * len(rungs) + "---|---|"]
  for kind, d, n, kap, method, T in sorted(agg):
    t = agg.get((kind, d, n, kap, "trained", T))
    if method != "construction" or T not in loops or t is None:
      continue
    c, p = agg[(kind, d, n, kap, method, T)], agg.get((kind, d, n, kap, "pgd", T), {})
    rung = "".join(f"{_fmt(agg.get((kind, d, n, kap, m, T), {}).get('mean'))} | " for m in rungs)
    lines.append(f"| {kind} | {d} | {n / d:g} | {kap:g} | {T} | {_fmt(c['mean'])} / {_fmt(c['expected_median'])} | "
                 f"{_fmt(p.get('mean'))} | {_fmt(t['mean'])} / {_fmt(t['expected_median'])} | {rung}"
                 f"{_fmt(t['mean'] / c['mean'] if c['mean'] else float('nan'))} | {t['diverged']}/{t['seeds']} |")
  return lines


def condition_table(config, rows, agg=None) -> list[str]:
  """Error / (error at T = 0) at grid.fixed_n_over_d, T = grid.fixed_loops, against κ_Σ."""
  agg = agg if agg is not None else aggregate(rows)
  g, T = config.grid, int(config.grid.fixed_loops)
  methods = _rule_methods(rows)
  lines = ["| task | d | κ_Σ | " + " | ".join(f"{m} mean / E_q median" for m in methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
  for kind in g.kinds:
    for d in g.trained_ds:
      n = n_context(d, g.fixed_n_over_d)
      for kap in sorted(float(k) for k in g.condition_numbers):
        if (kind, int(d), n, kap, "construction", T) not in agg:
          continue
        e0 = agg[(kind, int(d), n, kap, "construction", T)]["error_at_zero"]
        cells = [agg.get((kind, int(d), n, kap, m, T)) for m in methods]
        lines.append(f"| {kind} | {d} | {kap:g} | " + " | ".join(
            "—" if a is None else f"{_fmt(a['mean'] / e0)} / {_fmt(a['expected_median'] / e0)}"
            for a in cells) + " |")
  return lines


def contraction_table(config, rows, agg=None) -> list[str]:
  """The construction's fitted per-loop factor (median E_q, T ≤ 20) against ρ(κ̂)."""
  agg, g = agg if agg is not None else aggregate(rows), config.grid
  lines = ["| task | d | n/d | κ̂ (median) | theory ρ | fitted factor (median E_q, T ≤ 20) |",
           "|---|---|---|---|---|---|"]
  for kind in g.kinds:
    for d in g.ds:
      for r in g.n_over_d:
        n = n_context(d, r)
        Ts = sorted(k[5] for k in agg if k[:5] == (kind, int(d), n, 1.0, "construction") and k[5] <= 20)
        if len(Ts) < 2:
          continue
        slope = stats.log_linear_slope(
            Ts, [agg[(kind, int(d), n, 1.0, "construction", T)]["expected_median"] for T in Ts])
        factor = None if slope is None else math.exp(slope / (1 if kind == "vector_generation" else 2))
        c = agg[(kind, int(d), n, 1.0, "construction", Ts[0])]
        lines.append(f"| {kind} | {d} | {r:g} | {_fmt(c['kappa_hat'])} | {_fmt(c['rate'])} | {_fmt(factor)} |")
  return lines


def summary_markdown(config, rows: list[dict]) -> str:
  g = config.grid
  agg = aggregate(rows)  # the noise-free aggregate, once, for every table below
  mode = train_mode_of(config, 1.0)
  lines = [
      "# Reproduction grid: summary", "",
      "Error: query MSE (linear_regression) or ||Ŵ−W*||_F/||W*||_F (vector_generation) on each "
      "seed's held-out prompts. mean = the mean over the finite prompts of the single-query error "
      "(one random query per prompt: an unbiased estimate of the mean E_q); E_q = each prompt's "
      "expected error over the query (closed form in the method's effective weights; for "
      "vector_generation the error itself, which has no random query); E_q median / q90 = over "
      "all prompts (a non-finite one counts as +inf); 1-query median = the median of the "
      "single-query error (results.csv `single_query_error_median`: it mixes the query's spread "
      "into the prompts'). Every statistic is averaged over the seeds; n/d required: the mean, "
      "and the median and q90 of E_q. "
      f"ε = {g.epsilon:g} × the error at T = 0. Step rules: " + "; ".join(
          f"`{m}` {step_rules.LABELS[m]}" for m in step_rules.METHODS)
      + f". Tuned steps: {g.scan_prompts} scan prompts, shoulder {g.step_shoulder:g}, validated "
      f"on {g.validation_prompts} others. Trained: `{mode}` mode at T = {max(g.trained_loops)}.", "",
      "## Step rules: mean error / median E_q / single-query median", ""]
  lines += step_rule_table(config, rows, agg=agg)
  lines += ["", f"## n/d required for the statistic to reach ε = {g.epsilon:g}·(error at T = 0)", "",
            "The smallest n/d of the grid from which on (there and at every larger n/d) the statistic "
            "is below ε; `never`: not on this grid. (n_required.csv has every T.)", ""]
  lines += n_required_table(config, rows)
  lines += ["", "## Checks", ""] + checks(rows)
  noise = noise_table(config, rows)
  if noise:
    lines += ["", "## Label noise: optimisation error vs least squares' own error"] + noise
  lines += ["", "## Trained vs construction", ""] + headline_table(rows, agg=agg)
  lines += ["", f"## Error / error at T = 0 against κ_Σ (n/d = {g.fixed_n_over_d:g}, T = {g.fixed_loops})", ""]
  lines += condition_table(config, rows, agg=agg)
  lines += ["", "## Per-loop contraction of the construction (κ_Σ = 1)", ""] + contraction_table(config, rows, agg=agg)
  return "\n".join(lines) + "\n"
