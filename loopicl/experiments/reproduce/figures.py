"""The grid's figures: error vs T, error vs n/d and κ_Σ, and trained weights vs the construction.

Built from results.csv rows (via `outputs.aggregate`: mean line, min–max band over seeds) and
weights.csv rows, with the theory line ρ^T (`theory_line`) beside the construction and, in the
error-vs-T figure, the reference ladder's means as thin lines (`ladder.METHODS`).  matplotlib
is imported only when a figure is drawn (Agg canvas, no display).
"""
from __future__ import annotations

import numpy as np

from loopicl.experiments.reproduce import ladder, outputs, step_rules
from loopicl.experiments.reproduce.grid import n_context
from loopicl.experiments.reproduce.outputs import aggregate

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


LADDER_STYLE = {"cg": ("C2", ":"), "chebyshev": ("C3", "-."), "newton": ("C4", (0, (5, 2))),
                "whitened_gd": ("C5", (0, (1, 1, 3, 1))), "gdpp": ("C7", (0, (3, 1, 1, 1, 1, 1)))}


def _ladder_lines(ax, agg, setting) -> None:
  """The reference ladder's mean error vs T as thin lines (no band: they are references).

  The y-range stays that of the panel's other lines (×10⁻² … ×10 on a log axis): a rung that
  reaches least squares (~1e-30 on noiseless prompts) or diverges leaves the panel instead of
  squashing the construction / trained comparison (its numbers are in results.csv, summary.md).
  """
  main = [y for line in ax.lines for y in np.asarray(line.get_ydata(), float) if np.isfinite(y) and y > 0]
  for method in ladder.METHODS:
    Ts = sorted(k[5] for k in agg if k[:4] == setting and k[4] == method)
    if Ts:
      color, ls = LADDER_STYLE[method]
      ax.plot(Ts, [agg[setting + (method, T)]["mean"] for T in Ts], color=color, ls=ls, lw=0.9,
              label=ladder.LABELS[method])
  if main:
    _log(ax)
    ax.set_ylim(min(main) / 100, max(main) * 10)


def _log(ax):
  ys = [y for line in ax.lines for y in np.asarray(line.get_ydata(), float) if np.isfinite(y) and y > 0]
  if ys:
    ax.set_yscale("log")


def _normalised(a: dict) -> dict:
  """An aggregate's mean and band divided by its error at T = 0."""
  e0 = a["error_at_zero"]
  return {k: a[k] / e0 for k in ("mean", "lo", "hi")}


LINE_STYLES = ("-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1, 1, 1)))
# (aggregate key, colour, line style, label): the mean error and E_q's quantiles over prompts, and
# the single-query median for comparison (results.csv columns of the same names).
QUANTILE_STYLE = (("mean", "C3", "-", "mean"), ("expected_median", "C0", "-", "median E_q"),
                  ("expected_q90", "C0", "--", "q90 E_q"), ("expected_q99", "C0", ":", "q99 E_q"),
                  ("single_query_median", "C1", ":", "median, 1 query"))


def quantile_figure(config, agg, kind: str):
  """Mean, and the median, q90, q99 of E_q (each prompt's expected error), against T (to the
  largest T), one row per n/d, one column per step rule and the trained model, at the first d of
  grid.trained_ds, with the single-query median for comparison; ε·(error at T = 0) dotted."""
  g = config.grid
  d = int(g.trained_ds[0])
  methods = [m for m in step_rules.METHODS + ("trained",) if any(k[4] == m and k[0] == kind for k in agg)]
  fig, axes = _figure(len(g.n_over_d), len(methods), width=2.8, height=2.2)
  for i, r in enumerate(g.n_over_d):
    n = n_context(d, r)
    for j, m in enumerate(methods):
      ax = axes[i, j]
      Ts = sorted(k[5] for k in agg if k[:5] == (kind, d, n, 1.0, m))
      for stat, color, ls, label in QUANTILE_STYLE:
        ys = [agg[(kind, d, n, 1.0, m, T)][stat] for T in Ts]
        ax.plot(Ts, ys, color=color, ls=ls, lw=1, label=label)
      if Ts:
        a = agg[(kind, d, n, 1.0, m, Ts[0])]
        ax.axhline(a["epsilon"] * a["error_at_zero"], color="gray", ls=":", lw=0.8, label="ε·e₀")
        _log(ax)
      ax.set_title(f"{m}, n/d={r:g}", fontsize=7)
      if i == len(g.n_over_d) - 1:
        ax.set_xlabel("loops T", fontsize=7)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=7)
  fig.suptitle(f"{kind}, d={d}, κ_Σ=1: the distribution over prompts against T, per step rule "
               "(statistics averaged over seeds)", fontsize=8)
  return fig


def n_required_figure(config, req_rows, kind: str):
  """n/d required for the mean / E_q's median / E_q's q90 to reach ε, against T: one panel per (method,
  statistic), one line per d; `never` drawn above the grid's largest n/d."""
  g = config.grid
  rows = [r for r in req_rows if r["task_kind"] == kind and r["condition_number"] == 1.0
          and r["noise_std"] == 0.0]
  methods = [m for m in step_rules.METHODS + ("trained",) if any(r["method"] == m for r in rows)]
  top = 2.0 * max(float(x) for x in g.n_over_d)
  fig, axes = _figure(len(methods), len(outputs.N_REQUIRED_STATISTICS), width=3.0, height=2.3)
  for i, m in enumerate(methods):
    for j, statistic in enumerate(outputs.N_REQUIRED_STATISTICS):
      ax = axes[i, j]
      for c, d in enumerate(sorted({r["d"] for r in rows})):
        mine = sorted((r["loops"], r["n_over_d_required"]) for r in rows
                      if (r["method"], r["statistic"], r["d"]) == (m, statistic, d))
        if mine:
          ax.plot([T for T, _ in mine], [min(v, top) for _, v in mine], marker="o", ms=2.5, lw=1,
                  color=f"C{c}", label=f"d={d}")
      ax.axhline(top, color="gray", lw=0.6, ls=":")
      ax.text(1, top, " never", fontsize=6, va="bottom", color="gray")
      ax.set_xscale("log"); ax.set_yscale("log"); ax.set_ylim(min(float(x) for x in g.n_over_d) / 1.3, top * 1.6)
      ax.set_title(f"{m}: {statistic}", fontsize=7)
      if j == 0:
        ax.set_ylabel("n/d required", fontsize=7)
      if i == len(methods) - 1:
        ax.set_xlabel("loops T", fontsize=7)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=7)
  fig.suptitle(f"{kind}, κ_Σ=1: the smallest n/d from which on the statistic is ≤ ε·(error at T=0), "
               f"ε = {g.epsilon:g}", fontsize=8)
  return fig


def make_figures(config, rows: list[dict], weight_rows: list[dict]) -> dict:
  """name -> Figure: error vs T, error vs n/d, error vs κ_Σ (results.csv rows), weights vs the
  trained T (weights.csv rows)."""
  agg, g, figs = aggregate(rows), config.grid, {}
  kinds = [k for k in g.kinds if any(r["task_kind"] == k for r in rows)]
  ds = [int(d) for d in g.ds]
  req = outputs.n_required_rows(config, rows)
  for kind in kinds:
    figs[f"quantiles_vs_loops_{kind}"] = quantile_figure(config, agg, kind)
    if any(r["task_kind"] == kind for r in req):  # needs ≥ 2 n/d
      figs[f"n_required_{kind}"] = n_required_figure(config, req, kind)
    # 1. Error vs T, one panel per n/d, at the T the models are read at (the step rules to T = 200
    # are the quantile figure's).
    ratios, T_max = list(g.n_over_d), max(int(t) for t in g.trained_loops)
    trained_ds = [int(d) for d in g.trained_ds]
    fig, axes = _figure(len(trained_ds), len(ratios))
    for i, d in enumerate(trained_ds):
      for j, r in enumerate(ratios):
        ax, n = axes[i, j], n_context(d, r)
        for method, color, marker in (("construction", "C1", None), ("trained", "C0", "o")):
          Ts = sorted(T for (k, dd, nn, kap, m, T) in agg
                      if (k, dd, nn, kap, m) == (kind, d, n, 1.0, method) and T <= T_max)
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
        _ladder_lines(ax, agg, (kind, d, n, 1.0))
        ax.set_title(f"d={d}, n={n} (n/d={r:g}), κ̂≈{agg.get((kind, d, n, 1.0, 'construction', 1), {}).get('kappa_hat', float('nan')):.3g}",
                     fontsize=8)
        ax.set_xlabel("loops T")
        if j == 0:
          ax.set_ylabel(_error_label(kind), fontsize=8)
        _log(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:  # one legend for every panel, below them (7 entries do not fit inside a panel)
      ncol = max(1, min(4, len(handles), int(3.3 * len(ratios) / 2.3)))  # ~2.3 in per entry
      fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=6,
                 title="thin lines: the reference ladder (clipped to each panel's range)",
                 title_fontsize=6)
    fig.suptitle(f"{kind}: error vs loops (κ_Σ = 1; mean over seeds, band = min–max)", fontsize=9)
    figs[f"error_vs_loops_{kind}"] = fig

    # 2. Error vs n/d at T = fixed_loops; 3. error vs κ_Σ at (fixed n/d, fixed T).
    T = int(g.fixed_loops)
    fig, axes = _figure(1, 2, width=4.2, height=3.2)
    for d, ls in zip(ds, LINE_STYLES):
      for method, color, marker in (("construction", "C1", "s"), ("trained", "C0", "o")):
        xs = [r for r in ratios if (kind, d, n_context(d, r), 1.0, method, T) in agg]
        if xs:
          _band(axes[0, 0], xs, [agg[(kind, d, n_context(d, r), 1.0, method, T)] for r in xs],
                color, f"{method}, d={d}", marker, ls)
        n_fixed = n_context(d, g.fixed_n_over_d)
        ks = [float(k) for k in g.condition_numbers if (kind, d, n_fixed, float(k), method, T) in agg]
        if ks:  # divided by the error at T = 0: tr Σ/d (the query MSE's scale) differs 4× over κ_Σ
          _band(axes[0, 1], ks, [_normalised(agg[(kind, d, n_fixed, k, method, T)]) for k in ks],
                color, f"{method}, d={d}", marker, ls)
    axes[0, 0].axvline(1.0, color="gray", lw=0.8, ls=":")
    axes[0, 0].set_xscale("log"); axes[0, 0].set_xlabel("n / d")
    axes[0, 0].set_title(f"error vs n/d at T={T} (κ_Σ = 1)", fontsize=9)
    axes[0, 1].set_xscale("log"); axes[0, 1].set_xlabel("κ_Σ (condition number of Σ)")
    axes[0, 1].set_title(f"error / error at T=0 vs κ_Σ at n/d={g.fixed_n_over_d:g}, T={T}", fontsize=9)
    for ax in axes[0]:
      ax.set_ylabel(_error_label(kind), fontsize=8); _log(ax); ax.legend(fontsize=6)
    fig.suptitle(kind, fontsize=9)
    figs[f"error_vs_n_and_condition_{kind}"] = fig

    # 4. Learned vs construction: weight distance and implied-preconditioner alignment vs the T a
    # model was trained at (weights.csv: every trained model, seeds averaged).
    fig, axes = _figure(1, 3, width=3.4, height=3.0)
    for d, ls in zip(ds, LINE_STYLES):
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
