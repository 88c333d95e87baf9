"""Figures of an evaluation report (`evaluation.analyze`), drawn only from the report's numbers.

Every function takes the report dict (as returned or as read back from report.json) and returns a
`matplotlib.figure.Figure` rendered by the Agg canvas — no pyplot, so no global figure state and
no display backend.  Each data-carrying artist is tagged with `artist.set_gid(<report key>)`
(e.g. "model_error", "weights.P", "interpolation.error", "mechanism.model_kappa_hat_median"),
which is how the tests check that every plotted number is in report.json.  Null (non-finite)
values are drawn as gaps.  `FIGURES` names them all: the errors with the whole ladder of reference
algorithms, the sensitivity, weights, preconditioner, interpolation, the ladder (the model's
distance to every algorithm) and the mechanism (the input rows' spectrum over loops).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopicl.linear.ladder import key as algorithm_key

# (report key, legend label, style) of the error-vs-loops lines.
ERROR_LINES = (
    ("model_error", "learned model (mean)", dict(color="C0", lw=2.2, marker="o", ms=3)),
    ("model_expected_error_median", "learned model (median E_q: each prompt's expected error)",
     dict(color="C0", lw=1.2, ls="--")),
    ("model_error_median", "learned model (median, 1 query per prompt)", dict(color="C0", lw=1, ls=":")),
    ("gd_error", "GD, best constant step η*", dict(color="C1", lw=1.6)),
    ("pgd_error", "preconditioned GD, c*·Σ⁻¹", dict(color="C2", lw=1.6, ls="--")),
    ("least_squares_error", "least squares", dict(color="C3", lw=1.2, ls="-.")),
    ("ridge_error", "ridge, best λ", dict(color="C4", lw=1.2, ls=(0, (5, 1)))),
    ("bound", "theory line e₀·ρ(κ̃)²ᵗ", dict(color="gray", lw=1.2, ls="--")),
)

# The ladder of reference algorithms (`ladder`): name, legend label, style (thin, each its own
# colour and marker).  Some reach round-off (CG at t = d, Newton–Schulz soon: step t is 2ᵗ GD
# steps), so on errors.png they do not set the axis: what falls below the other curves is cut off.
LADDER_LINES = (
    ("cg", "conjugate gradients", dict(color="C5", lw=1.2, marker="s", ms=2.5)),
    ("chebyshev", "Chebyshev, Marchenko–Pastur bounds", dict(color="C6", lw=1.2, ls="--")),
    ("chebyshev_oracle", "Chebyshev, each prompt's λ_min, λ_max",
     dict(color="C6", lw=1.2, ls=":", marker=".", ms=3)),
    ("newton", "Newton–Schulz (step t ≈ 2ᵗ GD steps)",
     dict(color="C9", lw=1.2, ls="-.", marker="^", ms=2.5)),
    ("whitened_gd", "whitened GD, fitted (pq, η)", dict(color="C8", lw=1.6, marker="d", ms=2.5)),
    ("gdpp", "GD++, (γ, η) tuned for the mean", dict(color="C7", lw=1.6, marker="v", ms=2.5)),
    ("gdpp_oracle", "GD++, each prompt's (γ, η)", dict(color="C7", lw=1.2, ls=":", marker="v", ms=2)),
)
# Every candidate of `closest_algorithm`, for the ladder figure.
CANDIDATE_LINES = (("gd", "GD, best constant step η*", dict(color="C1", lw=1.6)),
                   ("pgd", "preconditioned GD, c*·Σ⁻¹", dict(color="C2", lw=1.6, ls="--")),
                   *LADDER_LINES)


# Lines constant in t (the fixed points GD and ridge converge to): floors, not curves.
FLOOR_LINES = ("least_squares_error", "ridge_error")


def _new(width: float, height: float, ncols: int = 1, nrows: int = 1):
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def _arr(values) -> np.ndarray:
  """A report list (None = non-finite) as a float array with NaN gaps."""
  return np.array([np.nan if v is None else v for v in values], np.float64)


def _mat(values) -> np.ndarray:
  """A matrix as float64 with NaN for None (report.json's nulls); arrays pass through."""
  return np.array([[np.nan if v is None else v for v in row] for row in values], np.float64)


def _g(x) -> str:
  return "n/a" if x is None else f"{x:.3g}"


def _log_y(ax, cap: float | None = None, floors: tuple[str, ...] = (), free: tuple[str, ...] = ()) -> None:
  """Log y over the tagged data lines, with explicit limits.

  A diverging model reaches 1e300, and a log axis autoscaled over that (or over inf) is useless:
  the view is clipped at `cap` with a note, the data in the lines stay as in the report.
  Floors (lines tagged with a gid in `floors`, e.g. least squares at 1e-30 on noise-free
  prompts) do not set the limits: one far below the curves is named at the bottom instead of
  squeezing every curve into the top of the axis.  Without any finite positive value the axis
  stays linear and says so.  Lines tagged with a gid in `free` are drawn but set no limit.
  """
  # Only the report's data lines (tagged with a gid): axvline's y data are axes fractions.
  values = np.concatenate([np.asarray(line.get_ydata(), float).ravel() for line in ax.lines
                           if line.get_gid() is not None and line.get_gid() not in floors + free]
                          or [np.zeros(0)])
  positive = values[np.isfinite(values) & (values > 0)]
  if positive.size == 0:
    ax.text(0.5, 0.5, "no finite positive values", transform=ax.transAxes, ha="center", color="gray")
    return
  with np.errstate(over="ignore"):  # limits around a 1e300 error overflow harmlessly
    ax.set_yscale("log")
  lo, hi = positive.min() / 2, positive.max() * 2
  if cap is not None and np.isfinite(cap) and cap > lo and (hi > cap or np.any(np.isinf(values))):
    hi = cap
    ax.text(0.99, 0.98, f"clipped above {cap:.0e} (diverged)", transform=ax.transAxes, ha="right",
            va="top", fontsize=8, color="gray")
  ax.set_ylim(lo, hi)
  below = [f"{line.get_label()} {np.nanmax(line.get_ydata()):.1e}" for line in ax.lines
           if line.get_gid() in floors and np.nanmax(line.get_ydata(), initial=-np.inf) < lo]
  if below:
    ax.text(0.01, 0.02, "below the axis: " + "; ".join(below), transform=ax.transAxes,
            fontsize=8, color="gray", gid="floors_below_axis")


def _cap(values, factor: float) -> float | None:
  """factor × the largest finite positive value (the top of a log axis a diverging curve may
  pass), or None without one."""
  v = _arr(values)
  v = v[np.isfinite(v) & (v > 0)]
  return factor * v.max() if v.size else None


def _error_cap(report) -> float | None:
  """The top of an error axis: 1e4 × the error of predicting 0 (e₀); above it a run has diverged."""
  e0 = report.get("bound_initial_error")
  return 1e4 * e0 if e0 else None


def _trained_marker(ax, report):
  ax.axvline(report["trained_loops"], color="k", lw=0.8, ls=":",
             label=f"trained T = {report['trained_loops']}")
  ax.set_xlim(0, report["loops_max"] + 1)  # the full range, even where a diverged model has no data


def error_vs_loops(report: dict[str, Any]) -> Figure:
  """Query MSE vs loops (log y): the model, every baseline and the ladder, the theory line, T."""
  fig, axes = _new(10, 5)
  ax = axes[0, 0]
  loops = np.asarray(report["loops"])
  for key, label, style in ERROR_LINES + tuple((f"{a}_error", lb, st) for a, lb, st in LADDER_LINES):
    if key in report:
      (line,) = ax.plot(loops, _arr(report[key]), label=label, **style)
      line.set_gid(key)
  _trained_marker(ax, report)
  _log_y(ax, cap=_error_cap(report), floors=FLOOR_LINES, free=tuple(f"{a}_error" for a, _, _ in LADDER_LINES))
  ax.set_xlabel("loop t")
  ax.set_ylabel("query MSE (held-out prompts)")
  bad = max(report.get("model_error_nonfinite", [0]))
  title = "Learned looped transformer vs GD baselines and the ladder of reference algorithms"
  ax.set_title(title + (f"\n(up to {bad} of {report['num_prompts']} prompts non-finite: "
                        "left out of the means)" if bad else ""), fontsize=11)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return fig


def sensitivity(report: dict[str, Any]) -> Figure:
  """von Oswald et al.'s alignment with GD per loop: sensitivity cosine; sensitivity / prediction L2."""
  fig, axes = _new(10, 4, ncols=2)
  loops = np.asarray(report["loops"])
  ax = axes[0, 0]
  (line,) = ax.plot(loops, _arr(report["sensitivity_cosine"]), color="C0", marker="o", ms=3,
                    label="cos(∂ŷ/∂x_q model, GD)")
  line.set_gid("sensitivity_cosine")
  _trained_marker(ax, report)
  ax.set_ylim(min(-0.05, np.nanmin(_arr(report["sensitivity_cosine"]), initial=0.0) - 0.05), 1.05)
  ax.set_xlabel("loop t")
  ax.set_ylabel("cosine similarity")
  ax.set_title("Sensitivity cosine with GD (η*)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax = axes[0, 1]
  for key, label, color in (("sensitivity_l2", "‖∂ŷ/∂x_q model − GD‖", "C1"),
                            ("prediction_l2", "‖ŷ model − ŷ GD‖", "C2")):
    (line,) = ax.plot(loops, _arr(report[key]), color=color, marker="o", ms=3, label=label)
    line.set_gid(key)
  _trained_marker(ax, report)
  _log_y(ax, cap=_cap([report[k][0] for k in ("sensitivity_l2", "prediction_l2")], 1e4))
  ax.set_xlabel("loop t")
  ax.set_ylabel("L2 distance (mean over prompts)")
  ax.set_title("Distance to GD in function space")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def _heatmap_pair(fig, ax_left, ax_right, left, right, titles, gids):
  """Two heatmaps on one symmetric colour scale (max |entry| of the pair) with one colorbar."""
  vmax = np.nanmax(np.abs(np.concatenate([left.ravel(), right.ravel()])), initial=0.0)
  vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
  for ax, mat, title, gid in ((ax_left, left, titles[0], gids[0]), (ax_right, right, titles[1], gids[1])):
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    im.set_gid(gid)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
  fig.colorbar(im, ax=[ax_left, ax_right], shrink=0.85)


def weight_heatmaps(P, Q, P_ref, Q_ref, *, scale=None, title: str = "") -> Figure:
  """Learned P, Q next to the GD construction moved to their scale (`weights.
  construction_at_learned_scale`), each pair on one symmetric colour scale.  The one weight
  heatmap: TensorBoard's (during training) and the report's."""
  fig, axes = _new(9, 8, ncols=2, nrows=2)
  c = "" if scale is None else f" (c = {_g(scale)})"
  _heatmap_pair(fig, axes[0, 0], axes[0, 1], _mat(P), _mat(P_ref),
                ("learned P", "construction c·P_GD" + c), ("weights.P", "weights.P_construction"))
  _heatmap_pair(fig, axes[1, 0], axes[1, 1], _mat(Q), _mat(Q_ref),
                ("learned Q", "construction Q_GD / c" + c), ("weights.Q", "weights.Q_construction"))
  if title:
    fig.suptitle(title)
  return fig


def weights_figure(report: dict[str, Any]) -> Figure:
  """The report's weight heatmaps, from report.json's `weights` matrices."""
  w = report["weights"]
  return weight_heatmaps(w["P"], w["Q"], w["P_construction"], w["Q_construction"],
                         scale=report.get("interpolation_scale"),
                         title=f"Weights vs GD construction (η* = {_g(report['gd_step_size'])}); "
                               f"weight distance {_g(report['weight_distance'])}, "
                               f"off-block {_g(report['offblock_fraction'])}")


def preconditioner(report: dict[str, Any]) -> Figure:
  """Implied preconditioner Â next to c*·Σ⁻¹ (same colours), and Â's eigenvalues in ℂ."""
  fig = Figure(figsize=(13, 4.3), layout="constrained")
  FigureCanvasAgg(fig)
  ax_a, ax_s, ax_e = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1, 1, 1.1]))
  _heatmap_pair(fig, ax_a, ax_s, _mat(report["implied_preconditioner"]),
                _mat(report["pgd_preconditioner"]),
                ("implied preconditioner Â", f"c*·Σ⁻¹ (c* = {_g(report['pgd_scale'])})"),
                ("implied_preconditioner", "pgd_preconditioner"))
  re, im = _arr(report["preconditioner_eigenvalues_real"]), _arr(report["preconditioner_eigenvalues_imag"])
  pts = ax_e.scatter(re, im, color="C0", s=30, label="eigenvalues of Â", zorder=3)
  pts.set_gid("preconditioner_eigenvalues")
  pgd_eig = np.linalg.eigvalsh(_mat(report["pgd_preconditioner"])) if np.all(
      np.isfinite(_mat(report["pgd_preconditioner"]))) else np.zeros(0)
  ref = ax_e.scatter(pgd_eig, np.zeros_like(pgd_eig), marker="x", color="C2", s=30,
                     label="eigenvalues of c*·Σ⁻¹", zorder=2)
  ref.set_gid("pgd_preconditioner.eigenvalues")
  if report["gd_step_size"] is not None:
    ax_e.axvline(report["gd_step_size"], color="C1", lw=1, ls="--", label="η* (plain GD)")
  ax_e.axhline(0, color="k", lw=0.5)
  ax_e.set_xlabel("Re λ")
  ax_e.set_ylabel("Im λ")
  asym = report.get("preconditioner_asymmetry")
  ax_e.set_title(f"spectrum of Â: {report['preconditioner_complex_eigenvalues']} complex, "
                 f"‖Â−Âᵀ‖/‖Â‖ = {_g(asym)}", fontsize=10)
  ax_e.grid(True, alpha=0.3)
  ax_e.legend(fontsize=8)
  return fig


def interpolation(report: dict[str, Any]) -> Figure:
  """Query MSE at the trained T along (1−α)·learned + α·construction (log y)."""
  fig, axes = _new(6.5, 4.3)
  ax = axes[0, 0]
  alphas = np.array([p["alpha"] for p in report["interpolation"]])
  for key, label, style in (("error", "mean", dict(color="C0", marker="o", ms=4)),
                            ("error_median", "median", dict(color="C0", ls=":"))):
    (line,) = ax.plot(alphas, _arr([p[key] for p in report["interpolation"]]), label=label, **style)
    line.set_gid(f"interpolation.{key}")
  i = report["trained_loops"] - 1
  for key, label, color in (("gd_error", "GD η* (α = 1 should match)", "C1"),
                            ("model_error", "learned (α = 0)", "C3")):
    if report[key][i] is not None:
      ax.axhline(report[key][i], color=color, lw=0.8, ls="--", label=label)
  _log_y(ax, cap=_error_cap(report))
  ax.set_xlabel("α   (0: learned weights, 1: GD construction rescaled by c)")
  ax.set_ylabel(f"query MSE at T = {report['trained_loops']}")
  ax.set_title("Loss along the straight line learned → construction")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def ladder(report: dict[str, Any]) -> Figure:
  """The model against every candidate of `closest_algorithm`, per loop: the RMS prediction
  difference (log y) and the cosine of the sensitivity ∂ŷ/∂x_q with the algorithm's W_t."""
  fig, axes = _new(12, 4.5, ncols=2)
  loops = np.asarray(report["loops"])
  for ax, metric in zip(axes[0], ("prediction_l2", "sensitivity_cosine")):
    for name, label, style in CANDIDATE_LINES:
      (line,) = ax.plot(loops, _arr(report[algorithm_key(name, metric)]), label=label,
                        **{"marker": "o", "ms": 2.5, **style})
      line.set_gid(algorithm_key(name, metric))
    _trained_marker(ax, report)
    ax.set_xlabel("loop t")
    ax.grid(True, which="both", alpha=0.3)
  _log_y(axes[0, 0], cap=_cap([report[algorithm_key(a, "prediction_l2")][0]
                                for a, _, _ in CANDIDATE_LINES], 1e4))
  axes[0, 0].set_ylabel("‖ŷ model − ŷ algorithm‖ / √m (mean)")
  axes[0, 0].set_title(f"Distance to each algorithm; closest at T: {report['closest_algorithm']} "
                       f"({_g(report['closest_algorithm_margin'])}× the runner-up's)", fontsize=10)
  axes[0, 1].set_ylabel("cosine similarity (mean)")
  axes[0, 1].set_title("Sensitivity cosine with each algorithm's W_t", fontsize=10)
  axes[0, 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return fig


def mechanism(report: dict[str, Any]) -> Figure:
  """κ̂, λ_min, λ_max of the input rows' covariance X_t X_tᵀ/n over loops t = 0..loops_max (median
  over prompts): the model next to the fitted whitening construction (log y)."""
  m = report["mechanism"]
  fig, axes = _new(13, 4, ncols=3)
  loops = np.asarray(m["loops"])
  for ax, (name, title) in zip(axes[0], (("kappa_hat", "κ̂ = λ_max / λ_min"), ("lambda_min", "λ_min"),
                                          ("lambda_max", "λ_max"))):
    for who, label, style in (("model", "learned model", dict(color="C0", lw=2, marker="o", ms=3)),
                              ("whitened_gd", f"whitening construction (pq = {_g(report.get('whitened_gd_pq'))})",
                               dict(color="C8", lw=1.4, ls="--"))):
      key = f"{who}_{name}_median"
      (line,) = ax.plot(loops, _arr(m[key]), label=label, **style)
      line.set_gid(f"mechanism.{key}")
    _trained_marker(ax, report)
    ax.set_xlim(-1, report["loops_max"] + 1)
    _log_y(ax, cap=_cap([m[f"{who}_{name}_median"][0] for who in ("model", "whitened_gd")], 1e6))
    ax.set_xlabel("loop t")
    ax.set_title(f"{title} of X_t X_tᵀ/n (median of {m['prompts']} prompts)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  return fig


FIGURES = {"errors": error_vs_loops, "sensitivity": sensitivity, "weights": weights_figure,
           "preconditioner": preconditioner, "interpolation": interpolation, "ladder": ladder,
           "mechanism": mechanism}


def all_figures(report: dict[str, Any]) -> dict[str, Figure]:
  """name → Figure for every figure of the report (the names `write_report` saves as PNGs)."""
  return {name: make(report) for name, make in FIGURES.items()}
