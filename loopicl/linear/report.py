"""The evaluation report's layout, what it says in words, and its outputs.

`evaluation.analyze` computes the numbers; this module owns what is read off them and how they
are written: the loop-indexed keys (`PER_LOOP_KEYS`, the ladder's included), the weight section
(`weight_report`: the learned (P, Q) against the GD construction, the implied preconditioner Â
against η*·I and c*·Σ⁻¹), the plain-language `findings`, report.json / report.md / figures /
weights.npz (`write_report`) and the TensorBoard scalars, text and figures (`log_to_tensorboard`).
The ladder of reference algorithms words its own sentences and tables (`ladder.findings`,
`ladder.markdown`), which `findings` and report.md include.

Every number is a Python float or None (JSON null) for a non-finite value; the `<key>_nonfinite`
counts beside the per-loop lists say why.  Shapes: P, Q: [D, D] with D = d + d_out.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from loopicl import jsonfile
from loopicl.linear import ladder, weights
from loopicl.linear.formatting import TIE, fmt, loop_table, verdict  # shared with ladder
from loopicl.stats import py_float

# Who has an expected error over the query in the report (`<name>_expected_error`, `_median`,
# `_q90`, `_q99`, one value per loop): everything with weights (evaluation's docstring).
EXPECTED_NAMES = ("model", "gd", "pgd", "least_squares", "ridge", *ladder.ALGORITHMS)
EXPECTED_KEYS = tuple(f"{name}_expected_error{s}" for name in EXPECTED_NAMES
                      for s in ("", "_median", "_q90", "_q99"))

# Loop-indexed report lists (aligned with `loops`) that `write_report` tabulates.
PER_LOOP_KEYS = ("model_error", "gd_error", "pgd_error", "least_squares_error", "ridge_error",
                 "bound", "sensitivity_cosine", "sensitivity_l2", "prediction_l2",
                 *ladder.ERROR_KEYS, *ladder.COMPARISON_KEYS,
                 *(f"{name}_expected_error{s}" for name in ("model", "gd", "pgd")
                   for s in ("", "_median")))

# Scalars worth a TensorBoard time series over training steps.
TB_SCALARS = ("weight_distance", "offblock_fraction", "gd_step_equivalent", "gd_step_size",
              "preconditioner_cosine_identity", "preconditioner_cosine_sigma_inv",
              "preconditioner_asymmetry", "preconditioner_complex_eigenvalues",
              "population_contraction", "model_rate", "gd_rate", "closest_algorithm_margin",
              "whitened_gd_pq", "whitened_gd_step", "gdpp_gamma", "gdpp_step")

# |Im λ| above this fraction of max |λ| counts as a complex eigenvalue.
COMPLEX_TOL = 1e-6


def _matrix_list(A) -> list:
  return [[py_float(x) for x in row] for row in np.asarray(A, np.float64)]


def weight_report(P, Q, P_construction, Q_construction, *, d_out, eta, c_pgd, sigma,
                  sigma_inv) -> dict[str, Any]:
  """Scalars and matrices describing (P, Q) against the construction and c·Σ⁻¹.

  P_construction, Q_construction: the plain-GD construction at η*, at the learned scale
  (`weights.construction_at_learned_scale`); they and (P, Q) end the dict as `weights`.
  """
  d = P.shape[0] - d_out
  A = np.asarray(weights.implied_preconditioner(P, Q, d_out), np.float64)
  identity = np.eye(d)
  gd_A, pgd_A = eta * identity, c_pgd * sigma_inv
  out: dict[str, Any] = {
      "weight_distance": py_float(weights.weight_distance(P, Q, d_out)),
      "offblock_fraction": py_float(weights.offblock_fraction(P, Q, d_out)),
      "gd_step_equivalent": py_float(weights.gd_step_equivalent(P, Q, d_out)),
      "preconditioner_cosine_identity": py_float(weights.matrix_cosine(A, identity)),
      "preconditioner_distance_identity_scaled": py_float(weights.relative_distance_after_scaling(A, identity)),
      "preconditioner_cosine_sigma_inv": py_float(weights.matrix_cosine(A, sigma_inv)),
      "preconditioner_distance_sigma_inv_scaled": py_float(weights.relative_distance_after_scaling(A, sigma_inv)),
  }
  with np.errstate(all="ignore"):
    # Unscaled: does Â match the tuned baselines' own preconditioners, not just their direction?
    out["preconditioner_distance_gd"] = py_float(np.linalg.norm(A - gd_A) / np.linalg.norm(gd_A))
    out["preconditioner_distance_pgd"] = py_float(np.linalg.norm(A - pgd_A) / np.linalg.norm(pgd_A))
    norm = np.linalg.norm(A)
    anti = 0.5 * (A - A.T)
    out["preconditioner_norm"] = py_float(norm)
    out["preconditioner_asymmetry"] = py_float(np.linalg.norm(A - A.T) / norm)
    out["preconditioner_max_asymmetry"] = py_float(np.max(np.abs(A - A.T)))
    out["preconditioner_symmetric_fraction"] = py_float(np.linalg.norm(0.5 * (A + A.T)) / norm)
    out["preconditioner_antisymmetric_fraction"] = py_float(np.linalg.norm(anti) / norm)
  finite = bool(np.all(np.isfinite(A)))
  if finite:
    eig = np.linalg.eigvals(A)
    eig = eig[np.lexsort((eig.imag, -np.abs(eig)))]
    scale = max(float(np.max(np.abs(eig))), 1e-300)
    n_complex = int(np.sum(np.abs(eig.imag) > COMPLEX_TOL * scale))
    # Population iteration matrix I − ΣÂ: its spectral radius is the per-loop contraction of
    # preconditioned GD with Â on the expected covariance (|1 − η| for plain GD on Σ = I).
    contraction = float(np.max(np.abs(np.linalg.eigvals(identity - sigma @ A))))
  else:
    eig, n_complex, contraction = np.zeros(0, complex), 0, float("nan")
  out.update(
      preconditioner_eigenvalues_real=[py_float(x) for x in eig.real],
      preconditioner_eigenvalues_imag=[py_float(x) for x in eig.imag],
      preconditioner_complex_eigenvalues=n_complex,
      population_contraction=py_float(contraction),
      implied_preconditioner=_matrix_list(A),
      pgd_preconditioner=_matrix_list(pgd_A),
      sigma_inv=_matrix_list(sigma_inv),
  )
  out["weights"] = {"P": _matrix_list(P), "Q": _matrix_list(Q),
                    "P_construction": _matrix_list(P_construction),
                    "Q_construction": _matrix_list(Q_construction)}
  return out


def findings(r: dict[str, Any]) -> list[str]:
  """Short sentences read off the report's numbers (what a reader should notice first)."""
  T, i = r["trained_loops"], r["trained_loops"] - 1
  out = []
  model, gd, pgd = r["model_error"][i], r["gd_error"][i], r["pgd_error"][i]
  nonfinite = r["model_error_nonfinite"][i]
  if model is None:
    out.append(f"model error at T={T} is non-finite on all {r['num_prompts']} prompts")
  else:
    same = pgd is not None and gd is not None and abs(pgd - gd) <= 1e-9 * abs(gd)
    for name, ref in (("the best constant-step GD" + (" (= preconditioned GD with c·Σ⁻¹: Σ ∝ I)"
                                                       if same else ""), gd),
                      ("preconditioned GD with c·Σ⁻¹", None if same else pgd)):
      if ref is not None and ref > 0:
        ratio = model / ref
        out.append(f"model error at T={T} is {ratio:.3g}× {name} ({fmt(model)} vs {fmt(ref)}): "
                   f"the model {verdict(ratio)} it")
    ls = r["least_squares_error"][0]
    if ls is not None:
      out.append(f"least squares (the GD fixed point) reaches {fmt(ls)}; ridge at λ={fmt(r['ridge_lambda'])} "
                 f"{fmt(r['ridge_error'][0])}")
  if nonfinite:
    out.append(f"{nonfinite} of {r['num_prompts']} prompts give a non-finite prediction at T={T} "
               f"(means are over the finite ones; median {fmt(r['model_error_median'][i])})")
  counts = r["model_error_nonfinite"]
  if max(counts) and max(counts) != nonfinite:
    first = next(t for t, k in zip(r["loops"], counts) if k)
    worst = max(counts)
    out.append(f"non-finite predictions start at loop {first}; at worst {worst} of "
               f"{r['num_prompts']} prompts (loop {r['loops'][counts.index(worst)]})")
  # The typical prompt: the median over prompts of each prompt's expected error over the query (a
  # single query's median mixes the query's spread in: ~0.4× as large for one query at d = 10).
  med = r.get("model_expected_error_median", r["model_error_median"])[i]
  if model is not None and med is not None and med > 0 and model / med > 10:
    out.append(f"the mean model error at T={T} is {model / med:.3g}× the median over prompts of "
               "its expected error over the query: a few prompts dominate it")
  if r["model_rate"] is not None and r["gd_rate"] is not None:
    out.append(f"per-loop error factor up to T (fit error ≈ C·r^t): model r = {r['model_rate']:.3g}, "
               f"GD r = {r['gd_rate']:.3g}")
  L = r["loops_max"]
  if L > T and model is not None:
    late = r["model_error"][L - 1]
    if late is None:
      out.append(f"past the trained T the model diverges: every prompt is non-finite at loop {L}")
    elif late > model * (1 + TIE):
      out.append(f"past the trained T the error grows: {fmt(late)} at loop {L} vs {fmt(model)} at T={T}")
    else:
      out.append(f"past the trained T the error keeps falling or holds: {fmt(late)} at loop {L}")
  asym, n_complex = r["preconditioner_asymmetry"], r["preconditioner_complex_eigenvalues"]
  if asym is not None:
    kind = "non-symmetric" if asym > TIE else "near-symmetric"
    out.append(f"implied preconditioner is {kind}: ||A−Aᵀ||/||A|| = {asym:.3g}, "
               f"{n_complex} complex eigenvalues")
    out.append(f"implied preconditioner vs η*·I: cosine {fmt(r['preconditioner_cosine_identity'])}, "
               f"relative distance {fmt(r['preconditioner_distance_gd'])}; vs c*·Σ⁻¹: cosine "
               f"{fmt(r['preconditioner_cosine_sigma_inv'])}")
  out.append(f"weights are {fmt(r['weight_distance'])} from the plain-GD line (P⊗Q sine), "
             f"{fmt(r['offblock_fraction'])} of ||P⊗Q|| outside the construction's blocks, "
             f"GD-step equivalent η̂ = {fmt(r['gd_step_equivalent'])} (η* = {fmt(r['gd_step_size'])})")
  cos, l2 = r["sensitivity_cosine"][i], r["sensitivity_l2"][i]
  out.append(f"at T={T} the sensitivity ∂ŷ/∂x_q has cosine {'n/a' if cos is None else f'{cos:.4f}'} with GD's (L2 distance "
             f"{fmt(l2)}); predictions differ by {fmt(r['prediction_l2'][i])} (L2)")
  errs = [p["error"] for p in r["interpolation"]]
  finite = [e for e in errs if e is not None]
  if finite and errs[0] is not None and errs[-1] is not None:
    peak = max(finite)
    ends = max(errs[0], errs[-1])
    shape = (f"a barrier ({peak / ends:.3g}× the worse end)" if peak > ends * (1 + TIE)
             else "no barrier")
    out.append(f"along the straight line learned → construction the error goes {fmt(errs[0])} → "
               f"{fmt(errs[-1])} with {shape}")
  return out + ladder.findings(r)


def report_markdown(report: dict[str, Any]) -> str:
  """A readable summary: scalars, findings and one table row per loop (the trained T in bold)."""
  r = report
  lines = [f"# Evaluation: {r['task'].get('kind', '?')}, d={r['task'].get('d')}, "
           f"n={r['task'].get('n_context')}, trained T={r['trained_loops']}", "",
           "## Findings", ""]
  lines += [f"- {f}" for f in r["findings"]]
  lines += ["", "## Scalars", "", "| quantity | value |", "|---|---|"]
  for k, v in r.items():
    if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
      lines.append(f"| {k} | {v if isinstance(v, int) else fmt(v)} |")
  cols = [("model_error", "model"), ("model_expected_error_median", "model median E_q"),
          ("model_error_median", "model median, 1 query"),
          ("model_error_nonfinite", "non-finite"), ("gd_error", "GD η*"),
          ("gd_expected_error_median", "GD median E_q"), ("pgd_error", "PGD c·Σ⁻¹"),
          ("least_squares_error", "LS"), ("ridge_error", "ridge"), ("bound", "theory line"),
          ("sensitivity_cosine", "sens. cos"), ("sensitivity_l2", "sens. L2"),
          ("prediction_l2", "pred. L2")]
  if "model_weight_error" in r:
    cols.insert(4, ("model_weight_error", "model ||Ŵ−W*||/||W*||"))
  cols = [(k, c) for k, c in cols if k in r]
  lines += ["", "## Per loop", "",
            "Errors against the noise-free targets. model, GD, PGD, LS, ridge: the mean over prompts. "
            "median E_q: the median over prompts of each prompt's expected error over the query "
            "(closed form in the effective weights, `<name>_expected_error_median` in report.json); "
            "median, 1 query: the median of one random query's error per prompt "
            "(`model_error_median`), which mixes the query's spread into the prompts'.", ""]
  lines += loop_table(r, [c for _, c in cols], lambda j: [
      str(r[k][j]) if k.endswith("nonfinite") else fmt(r[k][j]) for k, _ in cols])
  lines += ladder.markdown(r)
  lines += ["", "## Interpolation (learned → construction, at T)", "", "| α | error | median | non-finite |",
            "|---|---|---|---|"]
  lines += [f"| {p['alpha']:.3g} | {fmt(p['error'])} | {fmt(p['error_median'])} | {p['nonfinite']} |"
            for p in r["interpolation"]]
  lines += ["", "## Figures", ""]
  lines += [f"![{name}]({name}.png)" for name in ("errors", "sensitivity", "weights", "preconditioner",
                                                   "interpolation", "ladder", "mechanism")]
  return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], outdir: str, P=None, Q=None, *,
                 figures: dict | None = None) -> dict[str, str]:
  """Writes report.json, report.md, one PNG per figure and (if given) weights.npz with P, Q.

  figures: name → matplotlib Figure; default `plots.all_figures(report)`.  Returns name → path.
  """
  from loopicl.linear import plots  # matplotlib is only needed for output.
  os.makedirs(outdir, exist_ok=True)
  paths = {"json": os.path.join(outdir, "report.json"), "markdown": os.path.join(outdir, "report.md")}
  jsonfile.write(paths["json"], report, indent=1)
  with open(paths["markdown"], "w") as f:
    f.write(report_markdown(report))
  if P is not None and Q is not None:
    paths["weights_npz"] = os.path.join(outdir, "weights.npz")
    np.savez(paths["weights_npz"], P=np.asarray(P), Q=np.asarray(Q))
  figures = plots.all_figures(report) if figures is None else figures
  from loopicl import runlog
  for name, fig in figures.items():
    paths[name] = runlog.save_figure(fig, outdir, name)  # PNG, and a PDF beside it
  return paths


def log_to_tensorboard(report: dict[str, Any], figures: dict | None, logdir: str, step: int, *,
                       per_loop: bool = True, prefix: str = "analysis") -> None:
  """Logs the headline numbers, findings and figures at training step `step` (tensorboardX).

  `<prefix>/<key>_at_T` and the TB_SCALARS are indexed by `step`; with per_loop, the per-loop
  curves go to `<prefix>_by_loop/<key>` indexed by the loop t (a curve over loops, not over
  training: a later evaluation adds points at the same t).  Null (non-finite) values are skipped.
  The default prefix keeps clear of the training loop's own `eval/` tags, so this can write into
  the run's TensorBoard directory.
  """
  from loopicl import runlog
  writer = runlog.RunLog(logdir)  # null values are skipped by RunLog.scalars
  try:
    i = report["trained_loops"] - 1
    at_T = {f"{k}_at_T": report[k][i] for k in PER_LOOP_KEYS}
    if report["model_error"][i] is not None and report["gd_error"][i]:
      at_T["model_over_gd_at_T"] = report["model_error"][i] / report["gd_error"][i]
    at_T["model_nonfinite_at_T"] = report["model_error_nonfinite"][i]
    writer.scalars(step, {**at_T, **{k: report.get(k) for k in TB_SCALARS}}, prefix=f"{prefix}/")
    if per_loop:
      for j, t in enumerate(report["loops"]):
        writer.scalars(t, {k: report[k][j] for k in PER_LOOP_KEYS}, prefix=f"{prefix}_by_loop/")
    writer.text(step, f"{prefix}/findings", "\n".join(f"- {f}" for f in report["findings"]))
    for name, fig in (figures or {}).items():
      writer.figure(step, f"{prefix}/{name}", fig, close=False)
  finally:
    writer.close()
