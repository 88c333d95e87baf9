"""The evaluation report: exact on the GD construction, numpy float64 references for the
baselines, monotone distances under perturbation, non-finite robustness, figures ⊆ report.json.

All tests share one small task config so each jitted computation compiles once per session.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl.linear import algorithms, construction, evaluation, ladder, model as model_lib, plots
from loopicl.linear import baselines, tasks, weights
from loopicl.linear import report as report_lib
from tests import numpy_reference as ref

D_IN, D_OUT, M, N = 4, 1, 4, 12  # m = d: vector generation shares every compiled shape
T, L, PROMPTS = 6, 12, 256


def _task(**kw):
  c = tasks.default_config()
  c.d, c.d_out, c.n_queries, c.n_context = D_IN, D_OUT, M, N
  c.condition_number, c.rotate, c.noise_std = 4.0, True, 0.3  # PGD ≠ GD, ridge λ* > 0
  for k, v in kw.items():
    c[k] = v
  return c


def _analyze(P, Q, task=None, **kw):
  kw = {"trained_loops": T, "loops_max": L, "num_prompts": PROMPTS, "seed": 3, **kw}
  return evaluation.analyze(np.asarray(P), np.asarray(Q), task or _task(), **kw)


def _prompts(task, seed, which, count=PROMPTS):
  """The analysis' documented prompt sets: which=0 evaluation, which=1 scans."""
  return tasks.sample(jax.random.fold_in(jax.random.key(seed), which), task, count)


def _best_step(task, seed=3):
  with jax.enable_x64(True):
    s = _prompts(task, seed, 1)
    return construction.best_constant_step(s.X, s.Y, s.X_query, s.targets, steps=T)[0]


def _construction(step, d=D_IN, d_out=D_OUT, **kw):
  with jax.enable_x64(True):
    return tuple(np.asarray(w) for w in construction.gd_params(d, d_out, step_size=step, **kw))


@pytest.fixture(scope="module")
def gd_report():
  eta = _best_step(_task())
  P, Q = _construction(eta)
  return eta, P, Q, _analyze(P, Q)


def test_construction_is_exactly_gd(gd_report):
  eta, P, Q, r = gd_report
  assert r["gd_step_size"] == pytest.approx(eta, rel=1e-12)  # the scan prompts are as documented
  assert json.loads(json.dumps(r, allow_nan=False)) == r  # plain JSON as returned, no cleaning needed
  assert r["loops"] == list(range(1, L + 1))
  for key in report_lib.PER_LOOP_KEYS:
    assert len(r[key]) == L, key
  assert r["weight_distance"] < 1e-7 and r["offblock_fraction"] < 1e-7
  assert r["gd_step_equivalent"] == pytest.approx(eta, rel=1e-12)
  np.testing.assert_allclose(r["model_error"], r["gd_error"], rtol=1e-9)
  np.testing.assert_allclose(r["sensitivity_cosine"], 1.0, atol=1e-12)
  # Distances are 0 to rounding, relative to the size of the things compared (W_t, ŷ ~ 1).
  assert max(r["sensitivity_l2"]) < 1e-12 and max(r["prediction_l2"]) < 1e-12
  assert sum(r["model_error_nonfinite"]) == 0
  # The construction is its own nearest point on the orbit: scale 1, and a flat line at GD's error.
  assert r["interpolation_scale"] == pytest.approx(1.0, abs=1e-9)
  assert len(r["interpolation"]) >= 11
  np.testing.assert_allclose([p["error"] for p in r["interpolation"]], r["gd_error"][T - 1], rtol=1e-6)
  assert r["preconditioner_asymmetry"] == 0 and r["preconditioner_complex_eigenvalues"] == 0
  np.testing.assert_allclose(r["implied_preconditioner"], eta * np.eye(D_IN), rtol=1e-12)
  assert r["preconditioner_cosine_identity"] == pytest.approx(1.0, abs=1e-12)
  assert any("matches" in f for f in r["findings"])


def test_perturbation_grows_every_distance(gd_report):
  eta, P, Q, _ = gd_report
  rng = np.random.default_rng(0)
  R1, R2 = rng.standard_normal(P.shape), rng.standard_normal(Q.shape)
  previous = None
  for eps in (1e-3, 1e-2, 5e-2):
    r = _analyze(P + eps * R1, Q + eps * R2)
    now = {k: r[k] for k in ("weight_distance", "offblock_fraction")}
    now.update({k: r[k][T - 1] for k in ("sensitivity_l2", "prediction_l2")})
    now["1 - sensitivity_cosine"] = 1 - r["sensitivity_cosine"][T - 1]
    assert all(v > 0 for v in now.values()), now
    if previous is not None:
      for k in now:
        assert now[k] > previous[k], (k, eps)
    previous = now


def test_sensitivity_probes_equal_autodiff():
  """The probe-column sensitivities equal jax.jvp / jax.jacrev through the model, every query."""
  d_out = 2  # the general case: a [d_out, d] sensitivity per query
  D, m, n, loops = D_IN + d_out, 3, N, 3
  rng = np.random.default_rng(d_out)
  Z0 = rng.standard_normal((8, D, n + m))
  Z0[:, D_IN:, n:] = 0.0  # query labels are hidden
  with jax.enable_x64(True):
    Z0 = jnp.asarray(Z0)
    P, Q = (jnp.asarray(0.3 * rng.standard_normal((D, D))) for _ in range(2))
    preds, S = evaluation.query_sensitivities(P, Q, Z0, loops=loops, d_out=d_out, n_queries=m)
    auto = evaluation.query_sensitivities_autodiff(P, Q, Z0, loops=loops, d_out=d_out, n_queries=m)
    plain = model_lib.loop_readouts(P, Q, Z0, loops=loops, d_out=d_out, n_queries=m)
    assert S.shape == (loops, 8, d_out, D_IN) and auto.shape == (loops, 8, d_out, m, D_IN)
    np.testing.assert_allclose(preds, plain, rtol=1e-12, atol=1e-14)
    for j in range(m):
      np.testing.assert_allclose(S, auto[..., j, :], rtol=1e-10, atol=1e-13)
    # ŷ is linear in x_q given the context: ŷ_t = S_t x_q.
    np.testing.assert_allclose(preds, S @ Z0[:, :D_IN, n:], rtol=1e-10, atol=1e-13)
    # And one full reverse-mode Jacobian for a single prompt agrees too.
    jac = jax.jacrev(lambda xq: model_lib.loop_readouts(
        P, Q, Z0[:1].at[:, :D_IN, n:].set(xq), loops=loops, d_out=d_out, n_queries=m))(Z0[:1, :D_IN, n:])
    # jac: [loops, 1, d_out, m, 1, d, m]; the diagonal in the query index is S, the rest 0.
    for j in range(m):
      np.testing.assert_allclose(jac[:, 0, :, j, 0, :, j], S[:, 0], rtol=1e-10, atol=1e-13)
    assert np.all(np.asarray(jac[:, 0, :, 0, 0, :, 1]) == 0)


def test_baselines_against_numpy():
  """PGD (A = c*·Σ⁻¹), ridge at λ*, least squares and the theory line, recomputed in numpy float64."""
  task = _task()
  P, Q = _construction(0.3)
  r = _analyze(P, Q)
  with jax.enable_x64(True):
    ev, sc = _prompts(task, 3, 0), _prompts(task, 3, 1)
  X, Y, Xq, tg = (np.asarray(v, np.float64) for v in (ev.X, ev.Y, ev.X_query, ev.targets))
  sigma_inv = np.linalg.inv(tasks.covariance(task))
  c = r["pgd_scale"]
  W = ref.preconditioned_gd(X, Y, c * sigma_inv, L)
  pgd = [np.mean((W[t] @ Xq - tg) ** 2) for t in range(1, L + 1)]
  np.testing.assert_allclose(r["pgd_error"], pgd, rtol=1e-10)
  W = ref.preconditioned_gd(X, Y, r["gd_step_size"] * np.eye(D_IN), L)
  np.testing.assert_allclose(r["gd_error"], [np.mean((W[t] @ Xq - tg) ** 2) for t in range(1, L + 1)],
                             rtol=1e-10)
  assert abs(r["pgd_error"][T - 1] / r["gd_error"][T - 1] - 1) > 1e-3  # Σ ≠ I: a different baseline

  # c* is the best scale on the *scan* prompts, to 3 significant digits.
  Xs, Ys, Xqs, tgs = (np.asarray(v, np.float64) for v in (sc.X, sc.Y, sc.X_query, sc.targets))

  def scan_pgd(cc):
    return np.mean((ref.preconditioned_gd(Xs, Ys, cc * sigma_inv, T)[-1] @ Xqs - tgs) ** 2)
  assert scan_pgd(c) <= min(scan_pgd(c * 1.001), scan_pgd(c * 0.999))

  def ridge_pred(Xa, Ya, Xqa, lam):
    n = Xa.shape[-1]
    Wr = np.stack([y @ x.T @ np.linalg.inv(x @ x.T + n * lam * np.eye(D_IN)) for x, y in zip(Xa, Ya)])
    return Wr @ Xqa
  lam = r["ridge_lambda"]
  assert r["ridge_error"] == [pytest.approx(np.mean((ridge_pred(X, Y, Xq, lam) - tg) ** 2), rel=1e-10)] * L
  # With label noise the best λ is interior, and it is a local optimum on the scan prompts.
  scan_ridge = [np.mean((ridge_pred(Xs, Ys, Xqs, lam * f) - tgs) ** 2) for f in (1 / 1.01, 1.0, 1.01)]
  assert lam > 1e-6 and scan_ridge[1] <= min(scan_ridge[0], scan_ridge[2])
  W_ls = np.stack([np.linalg.lstsq(x.T, y.T, rcond=None)[0].T for x, y in zip(X, Y)])
  assert r["least_squares_error"][0] == pytest.approx(np.mean((W_ls @ Xq - tg) ** 2), rel=1e-9)
  assert r["ridge_error"][0] < r["least_squares_error"][0]  # ridge helps with noise, n = 3d

  eig = np.linalg.eigvalsh(X @ np.swapaxes(X, 1, 2) / N)
  kappa = np.median(eig[:, -1] / eig[:, 0])
  rho = (kappa - 1) / (kappa + 1)
  e0 = np.mean(tg ** 2)
  np.testing.assert_allclose(r["bound"], [e0 * rho ** (2 * t) for t in range(1, L + 1)], rtol=1e-10)


def test_expected_errors_against_numpy(gd_report):
  """report.json's expected error over the query E_q (mean, median, q90, q99 per loop) for the
  model, GD, PGD, least squares and the ladder: numpy float64 tr((W − W*) Σ (W − W*)ᵀ) of the
  iterates on the evaluation prompts.  The model is GD's construction: its E_q (from its
  sensitivity, read at the unit queries) is GD's.  report.md says which median it shows."""
  task, (eta, _, _, r) = _task(), gd_report
  with jax.enable_x64(True):
    ev = _prompts(task, 3, 0)
  X, Y, Ws = (np.asarray(v, np.float64) for v in (ev.X, ev.Y, ev.W_star))
  sigma = tasks.covariance(task)
  e_q = lambda W: np.einsum("...oi,ij,...oj->...", W - Ws, sigma, W - Ws) / D_OUT

  def check(name, E):  # E: [L, prompts]
    np.testing.assert_allclose(r[f"{name}_expected_error"], E.mean(-1), rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(r[f"{name}_expected_error_median"], np.median(E, -1), rtol=1e-9)
    for q in (90, 99):
      np.testing.assert_allclose(r[f"{name}_expected_error_q{q}"],
                                 np.quantile(E, q / 100, -1, method="inverted_cdf"), rtol=1e-9)
  check("gd", e_q(ref.preconditioned_gd(X, Y, eta * np.eye(D_IN), L)[1:]))
  check("pgd", e_q(ref.preconditioned_gd(X, Y, r["pgd_scale"] * np.linalg.inv(sigma), L)[1:]))
  W_ls = np.stack([np.linalg.lstsq(x.T, y.T, rcond=None)[0].T for x, y in zip(X, Y)])
  check("least_squares", np.broadcast_to(e_q(W_ls), (L, PROMPTS)))
  b, s = Y @ np.swapaxes(X, 1, 2) / N, X @ np.swapaxes(X, 1, 2) / N
  step = np.sum(b * b, axis=-1) / np.einsum("bod,bde,boe->bo", b, s, b)   # CG's first step
  assert r["cg_expected_error"][0] == pytest.approx(np.mean(e_q(step[..., None] * b)), rel=1e-9)
  np.testing.assert_allclose(r["model_expected_error"], r["gd_expected_error"], rtol=1e-9)
  np.testing.assert_allclose(r["model_expected_error_median"], r["gd_expected_error_median"], rtol=1e-9)
  for key in report_lib.EXPECTED_KEYS:
    assert len(r[key]) == L and all(v is not None and v > 0 for v in r[key]), key
  # One query per prompt: its mean estimates the mean E_q; its median is below E_q's median.
  assert 0.7 < r["gd_error"][T - 1] / r["gd_expected_error"][T - 1] < 1.3
  assert r["gd_error_median"][T - 1] < r["gd_expected_error_median"][T - 1]
  md = report_lib.report_markdown(r)
  assert "model median E_q" in md and "model median, 1 query" in md and "GD median E_q" in md


def test_nonsymmetric_preconditioner_findings():
  """A = η·I + skew part: the report finds the asymmetry, the complex pairs, and the error vs numpy."""
  task = _task()
  rng = np.random.default_rng(2)
  S = rng.standard_normal((D_IN, D_IN))
  A = 0.3 * np.eye(D_IN) + 0.1 * (S - S.T)
  P, Q = _construction(None, preconditioner=A)
  r = _analyze(2.0 * P, Q / 2.0)  # the (cP, Q/c) symmetry changes nothing in the report
  assert r["preconditioner_asymmetry"] == pytest.approx(np.linalg.norm(A - A.T) / np.linalg.norm(A), rel=1e-12)
  assert r["preconditioner_max_asymmetry"] == pytest.approx(np.max(np.abs(A - A.T)), rel=1e-12)
  eig = np.linalg.eigvals(A)
  assert r["preconditioner_complex_eigenvalues"] == int(np.sum(np.abs(eig.imag) > 1e-9)) == D_IN
  np.testing.assert_allclose(sorted(r["preconditioner_eigenvalues_imag"]), sorted(eig.imag), atol=1e-12)
  assert r["interpolation_scale"] > 0 and r["weight_distance"] > 0.1 and r["offblock_fraction"] < 1e-7
  text = " ".join(r["findings"])
  assert "non-symmetric" in text and f"{D_IN} complex eigenvalues" in text
  with jax.enable_x64(True):
    ev = _prompts(task, 3, 0)
  W = ref.preconditioned_gd(ev.X, ev.Y, A, L)
  expected = [np.mean((W[t] @ np.asarray(ev.X_query) - np.asarray(ev.targets)) ** 2) for t in range(1, L + 1)]
  np.testing.assert_allclose(r["model_error"], expected, rtol=1e-9)
  # The line's ends: the learned model, and the rescaled construction = the same function as GD.
  assert r["interpolation"][0]["error"] == pytest.approx(r["model_error"][T - 1], rel=1e-12)
  assert r["interpolation"][-1]["error"] == pytest.approx(r["gd_error"][T - 1], rel=1e-9)
  ratio = r["model_error"][T - 1] / r["gd_error"][T - 1]
  assert f"{ratio:.3g}× the best constant-step GD" in text


def test_nearest_on_orbit_matches_brute_force():
  rng = np.random.default_rng(4)
  Pc, Qc = _construction(0.4)
  for c_true in (-2.5, 0.3, 4.0):
    assert weights.nearest_on_orbit(c_true * Pc, Qc / c_true, Pc, Qc) == pytest.approx(c_true, rel=1e-9)
  PL, QL = Pc * 1.7 + 0.2 * rng.standard_normal(Pc.shape), Qc / 1.7 + 0.2 * rng.standard_normal(Qc.shape)
  grid = np.concatenate([-np.geomspace(1e-2, 1e2, 40001), np.geomspace(1e-2, 1e2, 40001)])
  cost = [np.sum((PL - c * Pc) ** 2) + np.sum((QL - Qc / c) ** 2) for c in grid]
  c = weights.nearest_on_orbit(PL, QL, Pc, Qc)
  assert c == pytest.approx(grid[int(np.argmin(cost))], rel=1e-3)
  assert np.sum((PL - c * Pc) ** 2) + np.sum((QL - Qc / c) ** 2) <= min(cost) + 1e-12


def _artist_data(fig):
  """gid → plotted numbers for every tagged artist of a figure."""
  out = {}
  for ax in fig.axes:
    for artist in list(ax.lines) + list(ax.images) + list(ax.collections):
      gid = artist.get_gid()
      if gid is None:
        continue
      if hasattr(artist, "get_ydata"):
        out[gid] = (np.asarray(artist.get_xdata(), float), np.asarray(artist.get_ydata(), float))
      elif hasattr(artist, "get_array") and artist.get_array() is not None and artist.get_array().ndim == 2:
        out[gid] = np.asarray(artist.get_array(), float)
      else:
        out[gid] = np.asarray(artist.get_offsets(), float)
  return out


def _nan(values):
  return np.array([np.nan if v is None else v for v in values], float)


def _check_figures_match(figs, report):
  seen = set()
  for name, fig in figs.items():
    data = _artist_data(fig)
    assert data, f"figure {name} has no tagged data"
    for gid, value in data.items():
      seen.add(gid)
      if gid.startswith("weights."):
        np.testing.assert_array_equal(value, _nan(sum(report["weights"][gid[8:]], [])).reshape(value.shape))
      elif gid in ("implied_preconditioner", "pgd_preconditioner"):
        np.testing.assert_array_equal(value, np.array(report[gid], float))
      elif gid == "preconditioner_eigenvalues":
        np.testing.assert_array_equal(value[:, 0], _nan(report["preconditioner_eigenvalues_real"]))
        np.testing.assert_array_equal(value[:, 1], _nan(report["preconditioner_eigenvalues_imag"]))
      elif gid == "pgd_preconditioner.eigenvalues":
        np.testing.assert_allclose(value[:, 0], np.linalg.eigvalsh(np.array(report["pgd_preconditioner"])))
      elif gid.startswith("mechanism."):  # the ladder's mechanism curves, over t = 0..loops_max
        x, y = value
        np.testing.assert_array_equal(x, report["mechanism"]["loops"])
        np.testing.assert_array_equal(y, _nan(report["mechanism"][gid[len("mechanism."):]]))
      elif gid.startswith("interpolation."):
        x, y = value
        np.testing.assert_array_equal(x, [p["alpha"] for p in report["interpolation"]])
        np.testing.assert_array_equal(y, _nan([p[gid.split(".")[1]] for p in report["interpolation"]]))
      else:
        x, y = value
        np.testing.assert_array_equal(x, report["loops"])
        np.testing.assert_array_equal(y, _nan(report[gid]))
  return seen


def test_report_json_holds_every_plotted_number(gd_report, tmp_path):
  _, P, Q, r = gd_report
  paths = report_lib.write_report(r, str(tmp_path), P, Q)
  with open(paths["json"]) as f:
    loaded = json.load(f)
  for name in plots.FIGURES:
    assert os.path.getsize(paths[name]) > 10_000, name
  md = open(paths["markdown"]).read()
  assert md.count("\n| ") >= L + 10 and r["findings"][0] in md
  np.testing.assert_array_equal(np.load(paths["weights_npz"])["P"], P)
  # Figures drawn from the JSON round trip show exactly the JSON's numbers...
  seen = _check_figures_match(plots.all_figures(loaded), loaded)
  assert {"model_error", "gd_error", "pgd_error", "least_squares_error", "ridge_error", "bound",
          "sensitivity_cosine", "sensitivity_l2", "prediction_l2", "interpolation.error",
          "weights.P", "weights.Q_construction", "implied_preconditioner",
          "preconditioner_eigenvalues"} <= seen
  # ...and the in-memory report draws the same figures as its JSON.
  _check_figures_match(plots.all_figures(r), loaded)
  fig = plots.error_vs_loops(loaded)
  ax = fig.axes[0]
  assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
  assert any(np.all(np.asarray(line.get_xdata()) == T) for line in ax.lines)  # the trained-T marker


def test_nonfinite_prompts_do_not_break_the_report(gd_report, tmp_path):
  _, P, Q, _ = gd_report
  rng = np.random.default_rng(0)
  P1, Q1 = P + 0.1 * rng.standard_normal(P.shape), Q + 0.1 * rng.standard_normal(Q.shape)
  r = _analyze(P1, Q1)
  counts = r["model_error_nonfinite"]
  assert counts[T - 1] == 0 and 0 < counts[-1] < PROMPTS  # some prompts blow up past T
  # Means are over the finite prompts: recompute the last loop in numpy.
  with jax.enable_x64(True):
    ev = _prompts(_task(), 3, 0)
  with np.errstate(all="ignore"):
    Z = np.asarray(ev.Z0, np.float64)
    for _ in range(L):  # Z ← Z + (1/n) P (C Cᵀ) Q Z with C the context columns
      C = Z[..., :N]
      Z = Z + P1 @ (C @ np.swapaxes(C, -1, -2)) @ Q1 @ Z / N
    err = np.mean((-Z[:, D_IN:, N:] - np.asarray(ev.targets)) ** 2, axis=(-2, -1))
  assert int(np.sum(~np.isfinite(err))) == counts[-1]
  assert r["model_error"][-1] == pytest.approx(np.mean(err[np.isfinite(err)]), rel=1e-6)
  median = np.median(np.where(np.isnan(err), np.inf, err))
  assert (r["model_error_median"][-1] is None) == (not np.isfinite(median))
  assert all(v is None or math.isfinite(v) for k in report_lib.PER_LOOP_KEYS for v in r[k])
  assert any("non-finite" in f for f in r["findings"])
  json.dumps(r, allow_nan=False)
  paths = report_lib.write_report(r, str(tmp_path / "a"), P1, Q1)
  json.load(open(paths["json"]))  # valid JSON (allow_nan=False when writing)

  # Entirely non-finite weights: every mean is null, every count is num_prompts, still no exception.
  bad = np.full_like(P, np.nan)
  r = _analyze(bad, Q)
  assert r["model_error"] == [None] * L and r["model_error_nonfinite"] == [PROMPTS] * L
  assert r["weight_distance"] is None and r["preconditioner_eigenvalues_real"] == []
  assert r["gd_error"][0] is not None  # baselines are unaffected
  paths = report_lib.write_report(r, str(tmp_path / "b"))
  assert json.load(open(paths["json"]))["model_error"] == [None] * L


def test_vector_generation_weight_error():
  """Vector generation: the read-out is Ŵ_t; its relative error against numpy."""
  task = _task(kind="vector_generation", noise_std=0.0, rotate=False, condition_number=1.0)
  P, Q = _construction(0.5)
  r = _analyze(P, Q, task)
  with jax.enable_x64(True):
    ev = _prompts(task, 3, 0)
  W = ref.preconditioned_gd(ev.X, ev.Y, 0.5 * np.eye(D_IN), L)
  Ws = np.asarray(ev.W_star)
  expected = [np.mean(np.linalg.norm(W[t] - Ws, axis=(-2, -1)) / np.linalg.norm(Ws, axis=(-2, -1)))
              for t in range(1, L + 1)]
  np.testing.assert_allclose(r["model_weight_error"], expected, rtol=1e-10)
  np.testing.assert_allclose(r["model_error"], [np.mean((W[t] - Ws) ** 2) for t in range(1, L + 1)],
                             rtol=1e-10)
  np.testing.assert_allclose(r["pgd_error"], r["gd_error"], rtol=1e-12)  # Σ = I: the same baseline
  assert "model ||Ŵ−W*||/||W*||" in report_lib.report_markdown(r)
  # The unit queries leave nothing random: E_q (Σ_q = I/d) is the query MSE itself.
  for name in ("model", "gd", "pgd", "cg"):
    np.testing.assert_allclose(r[f"{name}_expected_error"], r[f"{name}_error"], rtol=1e-10)
    np.testing.assert_allclose(r[f"{name}_expected_error_median"], r[f"{name}_error_median"], rtol=1e-10)


def test_tensorboard_logging(gd_report, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  _, _, _, r = gd_report
  figs = {"errors": plots.error_vs_loops(r)}
  report_lib.log_to_tensorboard(r, figs, str(tmp_path), step=7)
  acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  tags = acc.Tags()
  (event,) = acc.Scalars("analysis/model_error_at_T")
  assert event.step == 7 and event.value == pytest.approx(r["model_error"][T - 1], rel=1e-6)
  curve = acc.Scalars("analysis_by_loop/gd_error")
  assert [e.step for e in curve] == r["loops"]
  assert "analysis/errors" in tags["images"]
  assert "analysis/findings" in " ".join(tags["tensors"])


@pytest.mark.parametrize("kwargs,field", [
    ({"loops_max": T - 1}, "loops_max="),
    ({"d_out": 3}, "d_out="),
    ({"trained_loops": 0}, "trained_loops="),
    ({"num_prompts": 0}, "num_prompts="),
])
def test_bad_arguments_raise_value_error(kwargs, field):
  P, Q = _construction(0.3)
  with pytest.raises(ValueError, match="allowed") as info:
    _analyze(P, Q, **kwargs)
  assert field in str(info.value)
  with pytest.raises(ValueError, match="allowed"):
    _analyze(P[:-1, :-1], Q[:-1, :-1])


def test_least_squares_is_a_floor_not_the_axis_and_figures_have_pdfs(gd_report, tmp_path):
  """Noise-free least squares sits at ~1e-30: it is named below the axis instead of stretching
  it, so the curves keep the axis; every figure is written as PNG and PDF."""
  report = gd_report[3]
  report = dict(report, least_squares_error=[1e-30] * len(report["loops"]))
  fig = plots.error_vs_loops(report)
  ax = fig.axes[0]
  curves = [v for k, _, _ in plots.ERROR_LINES if k not in plots.FLOOR_LINES
            for v in report[k] if v]
  assert ax.get_ylim()[0] == pytest.approx(min(curves) / 2)  # the lowest curve sets it, not 1e-30
  notes = [t.get_text() for t in ax.texts if t.get_gid() == "floors_below_axis"]
  assert len(notes) == 1 and "least squares 1.0e-30" in notes[0]
  paths = report_lib.write_report(report, str(tmp_path))
  for name in plots.FIGURES:
    assert os.path.getsize(paths[name]) > 0
    with open(os.path.join(tmp_path, f"{name}.pdf"), "rb") as f:
      assert f.read(5) == b"%PDF-"


# ----------------------------------------------------------------------------------------------
# The ladder of reference algorithms: which algorithm did the loop learn?

def _numpy_prompts(task, seed=3, which=0):
  with jax.enable_x64(True):
    b = _prompts(task, seed, which)
  return tuple(np.asarray(v, np.float64) for v in (b.X, b.Y, b.X_query, b.targets, b.Z0))


def _spectral_errors(X, Y, Xq, tg, gain):
  """Query MSE of W = b·V diag(gain(s)) Vᵀ (Σ̂ = V diag(s) Vᵀ, b = Y Xᵀ/n) for t = 1..L: numpy float64.

  Every polynomial method from W_0 = 0 is such a spectral filter: W_t = b·Σ̂⁻¹(I − p_t(Σ̂)).
  gain(s, t) -> [batch, d] with s: [batch, d].
  """
  n = X.shape[-1]
  s, V = np.linalg.eigh(X @ np.swapaxes(X, 1, 2) / n)
  b = Y @ np.swapaxes(X, 1, 2) / n
  out = []
  for t in range(1, L + 1):
    W = (b @ V) * gain(s, t)[:, None, :] @ np.swapaxes(V, 1, 2)
    out.append(np.mean((W @ Xq - tg) ** 2))
  return np.array(out)


def test_ladder_errors_against_numpy(gd_report):
  """Every rung of the ladder, recomputed in numpy float64 from the same prompts."""
  task, r = _task(), gd_report[3]
  X, Y, Xq, tg, _ = _numpy_prompts(task)
  n = N
  # Chebyshev's fixed bounds are the Marchenko–Pastur edges of the task's Σ (floor 1e-3·λ₊).
  lam = tasks.covariance_spectrum(task)
  hi = lam.max() * (1 + np.sqrt(D_IN / n)) ** 2
  lo = max(lam.min() * (1 - np.sqrt(D_IN / n)) ** 2, 1e-3 * hi)
  assert (r["chebyshev_lambda_min"], r["chebyshev_lambda_max"]) == (pytest.approx(lo, rel=1e-12),
                                                                    pytest.approx(hi, rel=1e-12))

  def chebyshev(lo, hi):  # p_t(λ) = T_t((θ − λ)/δ) / T_t(θ/δ); lo, hi: scalars or [batch]
    lo, hi = np.reshape(lo, (-1, 1)), np.reshape(hi, (-1, 1))
    theta, delta = (hi + lo) / 2, (hi - lo) / 2
    basis = lambda t: np.polynomial.chebyshev.Chebyshev.basis(t)
    return lambda s, t: (1 - basis(t)((theta - s) / delta) / basis(t)(theta / delta)) / s
  np.testing.assert_allclose(r["chebyshev_error"], _spectral_errors(X, Y, Xq, tg, chebyshev(lo, hi)),
                             rtol=1e-8)
  eig = np.linalg.eigvalsh(X @ np.swapaxes(X, 1, 2) / n)
  np.testing.assert_allclose(r["chebyshev_oracle_error"],
                             _spectral_errors(X, Y, Xq, tg, chebyshev(eig[:, 0], eig[:, -1])), rtol=1e-8)
  # Newton–Schulz step t from M_0 = I/||Σ̂||_F is 2^t GD steps of step α = 1/||Σ̂||_F.
  alpha = 1 / np.sqrt(np.sum(eig ** 2, axis=-1, keepdims=True))
  np.testing.assert_allclose(r["newton_error"],
                             _spectral_errors(X, Y, Xq, tg, lambda s, t: (1 - (1 - alpha * s) ** 2 ** t) / s),
                             rtol=1e-8)
  # CG: its first step is the exact line search along b; after d steps it is least squares.
  b = Y @ np.swapaxes(X, 1, 2) / n
  sigma_hat = X @ np.swapaxes(X, 1, 2) / n
  step = np.sum(b * b, axis=-1) / np.einsum("bod,bde,boe->bo", b, sigma_hat, b)
  assert r["cg_error"][0] == pytest.approx(np.mean((step[..., None] * b @ Xq - tg) ** 2), rel=1e-10)
  np.testing.assert_allclose(r["cg_error"][D_IN - 1:], r["least_squares_error"][D_IN - 1:], rtol=1e-8)
  # Whitened GD: the looped construction itself, through the textbook loop, at the fitted knobs.
  pq, eta = r["whitened_gd_pq"], r["whitened_gd_step"]
  assert pq > 0 and eta > 0  # Σ ≠ I: whitening the inputs pays
  Pw = np.diag(np.r_[np.full(D_IN, pq), np.full(D_OUT, eta)])
  Qw = np.diag(np.r_[-np.ones(D_IN), np.zeros(D_OUT)])
  outs, _ = ref.looped_transformer_textbook(Pw, Qw, _numpy_prompts(task)[4], L, M, D_OUT)
  np.testing.assert_allclose(r["whitened_gd_error"], np.mean((outs - tg) ** 2, axis=(1, 2, 3)), rtol=1e-9)
  # The knobs are `fit_whitened_gd` on the scan prompts at T (here all of them: 256 < FIT_PROMPTS).
  with jax.enable_x64(True):
    sc = _prompts(task, 3, 1)
    fit = algorithms.fit_whitened_gd(sc.X, sc.Y, sc.X_query, sc.targets, steps=T)
  assert (pq, eta) == fit[:2] and r["whitened_gd_fit_prompts"] == PROMPTS
  for key in ladder.ERROR_KEYS + ladder.COMPARISON_KEYS:
    assert len(r[key]) == L and r[key + "_nonfinite"] == [0] * L, key
  for key in ladder.ERROR_KEYS:
    assert len(r[key + "_median"]) == L and key in report_lib.PER_LOOP_KEYS, key


def test_gdpp_rungs_against_numpy(gd_report):
  """report.json's GD++ rungs: `gdpp_error` (+ `_median`) is numpy's GD++ recursion at the knobs
  `fit_gdpp` finds on the scan prompts at T; `gdpp_oracle_error` is the same recursion at each
  evaluation prompt's `gdpp_oracle` knobs; both are in the per-loop keys, report.md and TensorBoard."""
  task, r = _task(), gd_report[3]
  X, Y, Xq, tg, _ = _numpy_prompts(task)
  with jax.enable_x64(True):
    sc = _prompts(task, 3, 1)
    fit = baselines.fit_gdpp(sc.X, sc.Y, sc.X_query, sc.targets, steps=T)
    oracle = baselines.gdpp_oracle(jnp.asarray(X), steps=T)
  assert (r["gdpp_gamma"], r["gdpp_step"]) == fit[:2] and r["gdpp_fit_prompts"] == PROMPTS
  assert r["gdpp_gamma"] > 0  # Σ ≠ I: the x-row update pays
  for name, (gamma, eta) in (("gdpp", fit[:2]), ("gdpp_oracle", [np.asarray(a) for a in oracle])):
    per_prompt = np.mean((ref.gdpp(X, Y, Xq, L, eta, gamma)[0] - tg) ** 2, axis=(2, 3))   # [L, batch]
    np.testing.assert_allclose(r[f"{name}_error"], per_prompt.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(r[f"{name}_error_median"], np.median(per_prompt, axis=1), rtol=1e-9)
    assert f"{name}_error" in report_lib.PER_LOOP_KEYS and r[f"{name}_error_nonfinite"] == [0] * L
  assert {"gdpp_gamma", "gdpp_step"} <= set(report_lib.TB_SCALARS)
  md = report_lib.report_markdown(r)
  assert "GD++ γ = " in md and "| GD++ (γ, η tuned for the mean) |" in md


def test_closest_algorithm_to_the_gd_construction_is_gd(gd_report):
  """GD's own construction: closest to GD at prediction L2 ≈ 0, far ahead of the runner-up; it
  never moves the input rows, so κ̂, λ_min, λ_max of X_t X_tᵀ/n are flat in t."""
  r = gd_report[3]
  ranking = r["closest_algorithm_ranking"]
  assert r["closest_algorithm"] == ranking[0][0] == "gd"
  assert sorted(a for a, _ in ranking) == sorted(ladder.CANDIDATES)
  assert [v for _, v in ranking] == sorted(v for _, v in ranking)
  assert ranking[0][1] == r["prediction_l2"][T - 1] < 1e-12
  assert r["pgd_prediction_l2"][T - 1] == dict(ranking)["pgd"] > 1e-3
  margin = r["closest_algorithm_margin"]
  assert margin is None or margin > 1e9  # null only when GD's L2 is exactly 0
  assert margin is None or margin == pytest.approx(ranking[1][1] / ranking[0][1], rel=1e-12)
  np.testing.assert_allclose(r["sensitivity_cosine"], 1.0, atol=1e-12)
  # Whitened GD's first step is η·b, parallel to GD's; later ones are a different algorithm.
  assert r["whitened_gd_sensitivity_cosine"][0] == pytest.approx(1.0, abs=1e-12)
  assert r["whitened_gd_sensitivity_cosine"][T - 1] < 1 - 1e-4
  text = " ".join(r["findings"])
  assert "closest to GD (η*)" in text and "against the ladder" in text
  assert "## Ladder of reference algorithms" in report_lib.report_markdown(r)

  mech = r["mechanism"]
  assert mech["loops"] == list(range(L + 1)) and mech["prompts"] == PROMPTS
  X = _numpy_prompts(_task())[0]
  eig = np.linalg.eigvalsh(X @ np.swapaxes(X, 1, 2) / N)
  for name, values in (("kappa_hat", eig[:, -1] / eig[:, 0]), ("lambda_min", eig[:, 0]),
                       ("lambda_max", eig[:, -1])):
    curve = np.array(mech[f"model_{name}_median"])
    assert np.all(curve == curve[0]), name  # flat: the input rows never change
    assert curve[0] == pytest.approx(np.median(values), rel=1e-10), name
    # The whitening construction starts from the same prompts but moves them: μ ↦ μ(1 − pq·μ)².
    mu, pq, expected = eig.copy(), r["whitened_gd_pq"], []
    for t in range(L + 1):
      expected.append(np.median({"kappa_hat": mu.max(-1) / mu.min(-1), "lambda_min": mu.min(-1),
                                 "lambda_max": mu.max(-1)}[name]))
      mu = mu * (1 - pq * mu) ** 2
    np.testing.assert_allclose(mech[f"whitened_gd_{name}_median"], expected, rtol=1e-8)
  whitened = mech["whitened_gd_kappa_hat_median"]
  assert np.all(np.diff(whitened) < 0)  # κ̂ falls every loop: not flat


def test_closest_algorithm_to_the_whitening_construction_is_whitened_gd(gd_report):
  """The fitted whitening construction's own (P, Q) through analyze: closest to whitened GD at
  L2 ≈ 0, its error is whitened_gd_error, and its mechanism curves are the construction's."""
  r = gd_report[3]
  with jax.enable_x64(True):
    Pw, Qw = (np.asarray(w) for w in algorithms.whitened_gd_weights(
        D_IN, D_OUT, p=r["whitened_gd_pq"], q=1.0, step_size=r["whitened_gd_step"]))
  rw = _analyze(Pw, Qw)
  assert (rw["whitened_gd_pq"], rw["whitened_gd_step"]) == (r["whitened_gd_pq"], r["whitened_gd_step"])
  assert rw["closest_algorithm"] == "whitened_gd"
  (_, l2), (_, runner) = rw["closest_algorithm_ranking"][:2]
  assert l2 < 1e-12 and runner > 1e-3
  assert rw["closest_algorithm_margin"] is None or rw["closest_algorithm_margin"] > 1e9
  assert max(rw["whitened_gd_prediction_l2"]) < 1e-12
  np.testing.assert_allclose(rw["whitened_gd_sensitivity_cosine"], 1.0, atol=1e-12)
  np.testing.assert_allclose(rw["model_error"], rw["whitened_gd_error"], rtol=1e-9)
  np.testing.assert_allclose(rw["whitened_gd_error"], r["whitened_gd_error"], rtol=1e-12)
  for name in ladder.SPECTRUM:
    np.testing.assert_allclose(rw["mechanism"][f"model_{name}_median"],
                               rw["mechanism"][f"whitened_gd_{name}_median"], rtol=1e-9)
  assert "closest to whitened GD" in " ".join(rw["findings"])


def test_ladder_figures_hold_report_numbers(gd_report):
  """errors.png shows the whole ladder (round-off rungs do not set the axis), the ladder and
  mechanism figures plot exactly the report's numbers."""
  r = json.loads(json.dumps(gd_report[3]))
  figs = {name: plots.FIGURES[name](r) for name in ("errors", "ladder", "mechanism")}
  seen = _check_figures_match(figs, r)
  assert set(ladder.ERROR_KEYS) <= seen
  assert {ladder.key(a, m) for a in ladder.CANDIDATES for m in ("prediction_l2", "sensitivity_cosine")} <= seen
  assert {f"mechanism.{who}_{name}_median" for who in ("model", "whitened_gd")
          for name in ladder.SPECTRUM} <= seen
  labels = [t.get_text() for t in figs["errors"].axes[0].get_legend().get_texts()]
  assert len(labels) == len(set(labels)) >= len(plots.ERROR_LINES) + len(ladder.ALGORITHMS)
  # CG at round-off (noise-free prompts reach ~1e-30 at t = d) does not stretch the axis.
  low = dict(r, cg_error=[1e-30] * L, newton_error=[1e-31] * L)
  assert plots.error_vs_loops(low).axes[0].get_ylim() == figs["errors"].axes[0].get_ylim()
