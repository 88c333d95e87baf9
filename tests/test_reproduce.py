"""The reproduction grid end to end (tiny): resume, the ladder against numpy, the grid's config errors."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from loopicl import config as config_lib, study
from loopicl.experiments import reproduce
from loopicl.linear import expected_error
from tests import numpy_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  return config_lib.load_file(os.path.join(ROOT, "configs", name + ".py"))


def tiny_grid(train_mode="window"):
  c = _load("reproduce_quick")
  g = c.grid
  g.kinds, g.ds, g.n_over_d, g.condition_numbers = ("linear_regression",), (3,), (4.0,), (1.0,)
  g.loops, g.fixed_loops, g.seeds = (1, 2, 3, 4, 6), 2, (0, 1)
  # window: one model trained at T = 4 (loss on loops 1..4), read at T = 2 and 4; per_loops: one
  # model per T, here only T = 2.
  g.train_mode, g.trained_loops = train_mode, ((2, 4) if train_mode == "window" else (2,))
  g.weight_loops = (2,)  # window: one more model, trained at T = 2, for the weights-vs-T figure
  g.eval_prompts, g.cpu_devices = 256, 0  # pytest's JAX already runs on one device
  g.trained_ds, g.noise_stds, g.ladder = (3,), (), reproduce.LADDER_METHODS
  g.trained_n_over_d, g.noise_kinds = (4.0,), ("linear_regression",)
  g.scan_prompts = g.validation_prompts = 2048
  g.tuned_max_d = 3
  t = c.experiment.train
  t.steps, t.batch_size, t.steps_per_call, t.warmup_steps = 40, 16, 20, 5
  return c


def _check_ladder_rows(rows, max_loops):
  """Every ladder method has one row at each (setting, T ≤ max_loops, seed) of a construction
  row, on the construction's prompts: GD's error and error at W = 0 copied, ratio = error / GD's."""
  assert {r["method"] for r in rows} >= set(reproduce.LADDER_METHODS)
  key = lambda r: (r["task_kind"], r["d"], r["n_context"], r["condition_number"], r["loops"], r["seed"])
  gd = {key(r): r for r in rows if r["method"] == "construction" and int(r["loops"]) <= max_loops}
  for method in reproduce.LADDER_METHODS:
    mine = [r for r in rows if r["method"] == method]
    assert sorted(map(key, mine)) == sorted(gd), method
    for r in mine:
      c = gd[key(r)]
      assert (r["gd_error"], r["error_at_zero"], r["kappa_hat"]) == (c["error"], c["error_at_zero"],
                                                                     c["kappa_hat"])
      assert float(r["ratio_to_construction"]) == pytest.approx(
          float(r["error"]) / float(c["error"]), rel=2e-5)
      assert r["nonfinite"] == "0" and r["train_mode"] == r["weight_distance"] == ""


def _check_distribution_columns(rows):
  """The distribution columns — of the single-query error and of each prompt's expected error
  E_q — are present and consistent on every row."""
  for r in rows:
    if r["diverged"] == "1":
      continue
    for prefix, frac in (("single_query_error", "single_query_frac_below_eps"),
                         ("expected_error", "frac_expected_below_eps")):
      med, q90, q99 = (float(r[f"{prefix}_{c}"]) for c in ("median", "q90", "q99"))
      assert 0.0 < med <= q90 <= q99 and 0.0 <= float(r[frac]) <= 1.0, r
    if float(r["expected_error_median"]) > 1e-20:  # above float64 round-off (CG, Newton reach it)
      # One query per prompt: E_q's median is above the single-query median (a χ²₁ factor's
      # median is 0.45 of its mean).
      assert float(r["single_query_error_median"]) < float(r["expected_error_median"]), r
    assert float(r["epsilon"]) == 1e-3 and int(r["nonfinite"]) >= 0


def _expected_errors(W, W_star, sigma):
  """numpy float64 E_q per prompt: tr((W − W*) Σ (W − W*)ᵀ)/d_out, W [..., batch, d_out, d]."""
  D = W - W_star
  return np.einsum("...oi,ij,...oj->...", D, sigma, D) / D.shape[-2]


@pytest.mark.parametrize("train_mode", ["window", pytest.param("per_loops", marks=pytest.mark.slow)])
def test_tiny_grid_end_to_end_and_resume(tmp_path, train_mode):
  config = tiny_grid(train_mode)
  logs = []
  out = reproduce.run(config, str(tmp_path), log=logs.append)
  assert out["skipped"] == 0 and out["computed"] == len(reproduce.points(config))
  with open(tmp_path / "results.csv") as f:
    all_rows = list(csv.DictReader(f))
  _check_ladder_rows(all_rows, max(config.grid.trained_loops))  # the reference ladder's rows
  _check_distribution_columns(all_rows)
  rows = [r for r in all_rows if r["method"] not in reproduce.LADDER_METHODS]
  assert tuple(all_rows[0]) == reproduce.CSV_COLUMNS
  methods = {r["method"] for r in rows}
  assert methods == set(reproduce.STEP_RULES) | {"trained"}
  # One row per (setting, T, seed, method): step rules at every T, trained at trained_loops.
  assert len(rows) == 2 * (len(reproduce.STEP_RULES) * 5 + len(config.grid.trained_loops))
  assert sorted({int(r["loops"]) for r in rows if r["method"] == "trained"}) == list(config.grid.trained_loops)
  trained = [r for r in rows if r["method"] == "trained"]
  # weights.csv: one row per trained model and seed, at the T it was trained at.
  with open(tmp_path / "weights.csv") as f:
    weight_rows = list(csv.DictReader(f))
  assert sorted({int(r["trained_loops"]) for r in weight_rows}) == ([2, 4] if train_mode == "window" else [2])
  assert len(weight_rows) == 2 * (2 if train_mode == "window" else 1)
  for r in weight_rows:
    assert 0.0 <= float(r["offblock_fraction"]) <= 1.0 and np.isfinite(float(r["weight_distance"]))
    if train_mode == "per_loops" or r["trained_loops"] == "4":  # the results.csv model, at its T
      same = [x for x in trained if x["seed"] == r["seed"] and x["loops"] == r["trained_loops"]]
      assert float(same[0]["error"]) == pytest.approx(float(r["error"]), rel=1e-5)
  # The claim's core: at n = 4d the construction's error falls with every loop, for every seed.
  for seed in ("0", "1"):
    errs = [float(r["error"]) for r in rows if r["method"] == "construction" and r["n_context"] == "12"
            and r["seed"] == seed]
    assert len(errs) == 5 and all(b < a for a, b in zip(errs, errs[1:])), errs
  assert all(np.isfinite(float(r["error"])) or r["diverged"] == "1" for r in trained)
  # Every step rule's error is GD at its step, iterated in numpy on the seed's test prompts.
  with jax.enable_x64(True):
    task = reproduce.task_config(config, "linear_regression", 3, 12, 1.0)
    test, _ = reproduce.eval_prompts(task, config.grid.eval_seed, 1, config.grid.eval_prompts)
  X, Y, Xq, tg = (np.asarray(a, np.float64) for a in (test.X, test.Y, test.X_query, test.targets))
  sigma = expected_error.query_covariance(task)
  for method in ("construction", "construction_safe", "construction_mp"):
    for r in (r for r in rows if r["method"] == method and r["seed"] == "1" and r["loops"] in ("2", "6")):
      W = numpy_reference.preconditioned_gd(X, Y, float(r["step_size"]) * np.eye(3), int(r["loops"]))[-1]
      assert float(r["error"]) == pytest.approx(np.mean((W @ Xq - tg) ** 2), rel=1e-5)
      # Each prompt's expected error over the query, and its distribution over the prompts.
      E = _expected_errors(W, np.asarray(test.W_star), sigma)
      assert float(r["expected_error"]) == pytest.approx(np.mean(E), rel=1e-5)
      for col, q in (("median", 0.5), ("q90", 0.9), ("q99", 0.99)):
        assert float(r[f"expected_error_{col}"]) == pytest.approx(
            np.quantile(E, q, method="inverted_cdf"), rel=1e-5), (method, col)
      eps = float(r["epsilon"]) * float(r["error_at_zero"])
      assert float(r["frac_expected_below_eps"]) == pytest.approx(np.mean(E <= eps), abs=1e-6)
  assert all(r["bound_violations"] == "0" for r in rows if r["method"] == "construction_oracle")
  with open(tmp_path / "n_required.csv") as f:
    assert tuple(next(csv.reader(f))) == reproduce.N_REQUIRED_COLUMNS
  assert (tmp_path / "summary.md").exists()
  assert (tmp_path / "error_vs_loops_linear_regression.png").exists()
  # Resume: every finished point is skipped, the CSV is unchanged.
  before = (tmp_path / "results.csv").read_text()
  again = reproduce.run(config, str(tmp_path), log=logs.append)
  assert again["computed"] == 0 and again["skipped"] == out["computed"]
  assert (tmp_path / "results.csv").read_text() == before


def test_ladder_errors_match_independent_numpy(tmp_path):
  """The ladder's results.csv rows of a construction point (no trained point: written by
  write_outputs), recomputed in numpy float64 from the same test prompts (`eval_prompts`):
  CG at T >= d is least squares; Newton-Schulz at T is 2^T GD steps of step 1/||Σ̂||_F."""
  config = tiny_grid()
  config.experiment.task.noise_std = 0.1  # least squares then differs from W* (no 0 = 0 check)
  p = [q for q in reproduce.points(config) if q["method"] == "construction"][0]
  data = reproduce.run_construction(config, p)
  data.update(point=p, fingerprint=reproduce.fingerprint(config, p), wall_s=0.0, id=reproduce.point_id(p))
  study.write_point(str(tmp_path), reproduce.point_id(p), data)
  rows = reproduce.write_outputs(config, str(tmp_path), figures=False)
  with open(tmp_path / "results.csv") as f:
    csv_rows = list(csv.DictReader(f))
  ladder_loops = [T for T in config.grid.loops if T <= max(config.grid.trained_loops)]
  assert len(csv_rows) == len(rows) == 2 * (5 * len(reproduce.STEP_RULES) + len(ladder_loops) * len(reproduce.LADDER_METHODS))
  _check_ladder_rows(csv_rows, max(config.grid.trained_loops))
  error = lambda method, T, seed, col="error": float(next(
      r[col] for r in csv_rows if (r["method"], r["loops"], r["seed"]) == (method, str(T), str(seed))))
  sigma_q = expected_error.query_covariance(reproduce.task_config(config, p["kind"], p["d"], p["n"], p["kappa"]))
  task = reproduce.task_config(config, p["kind"], p["d"], p["n"], p["kappa"])
  for seed in config.grid.seeds:
    with jax.enable_x64(True):
      test, _ = reproduce.eval_prompts(task, config.grid.eval_seed, seed, config.grid.eval_prompts)
    X, Y, Xq, targets = (np.asarray(a, np.float64) for a in (test.X, test.Y, test.X_query, test.targets))
    n = X.shape[-1]
    sigma, b = X @ X.transpose(0, 2, 1) / n, Y @ X.transpose(0, 2, 1) / n
    mse = lambda W: float(np.mean(np.mean((W @ Xq - targets) ** 2, axis=(1, 2))))
    w_ls = np.linalg.solve(sigma, b.transpose(0, 2, 1)).transpose(0, 2, 1)  # b Σ̂⁻¹ (Σ̂ symmetric)
    E = lambda W: _expected_errors(W, np.asarray(test.W_star), sigma_q)  # per prompt
    for T in (3, 4):  # T >= d = 3
      assert error("cg", T, seed) == pytest.approx(mse(w_ls), rel=1e-5)
      assert error("cg", T, seed, "expected_error") == pytest.approx(np.mean(E(w_ls)), rel=1e-5)
      assert error("cg", T, seed, "expected_error_median") == pytest.approx(
          np.quantile(E(w_ls), 0.5, method="inverted_cdf"), rel=1e-5)
    alpha = 1 / np.linalg.norm(sigma, axis=(1, 2))[:, None, None]
    W = np.zeros_like(b)
    for t in range(1, 2 ** 4 + 1):
      W = W - alpha * (W @ sigma - b)
      if t in (2, 4, 8, 16):  # 2^T GD steps: Newton-Schulz step T = 1..4
        assert error("newton", int(np.log2(t)), seed) == pytest.approx(mse(W), rel=1e-5)
        assert error("newton", int(np.log2(t)), seed, "expected_error_q90") == pytest.approx(
            np.quantile(E(W), 0.9, method="inverted_cdf"), rel=1e-5)
    assert error("cg", 4, seed) < error("construction", 4, seed)


def test_n_required_reads_the_expected_error_statistics():
  """n_required.csv: the mean is the single-query error's mean (as before), the median and q90
  are E_q's (`expected_error_median`, `_q90`), never the single-query columns.  Here the
  single-query median and q90 reach ε at every n/d, E_q's median only at n/d = 4, its q90 never."""
  config = tiny_grid()
  config.grid.n_over_d = (2.0, 4.0)
  rows = []
  for r_over_d, expected_median in ((2.0, 0.5), (4.0, 1e-6)):
    row = {c: "" for c in reproduce.CSV_COLUMNS}
    row.update(task_kind="linear_regression", d=3, n_context=int(3 * r_over_d), condition_number=1.0,
               noise_std=0.0, loops=5, seed=0, method="construction", error=1e-6, diverged=0,
               nonfinite=0, epsilon=1e-3, error_at_zero=1.0, single_query_error_median=1e-9,
               single_query_error_q90=1e-9, expected_error_median=expected_median,
               expected_error_q90=1.0)
    rows.append(row)
  need = {r["statistic"]: r["n_over_d_required"] for r in reproduce.n_required_rows(config, rows)}
  assert need == {"mean": 2.0, "expected_median": 4.0, "expected_q90": float("inf")}


def test_condition_settings_train_in_their_own_mode():
  """grid.condition_train_mode: the κ_Σ > 1 settings (read at fixed_loops only) train with the
  last-loop loss while κ_Σ = 1 keeps the window loss; only their points' fingerprints change."""
  config = tiny_grid("window")
  config.grid.condition_numbers, config.grid.condition_train_mode = (1.0, 10.0), "window"
  before = {reproduce.point_id(p): reproduce.fingerprint(config, p) for p in reproduce.points(config)}
  config.grid.condition_train_mode = "per_loops"
  trained = [p for p in reproduce.points(config) if p["method"] == "trained"]
  assert [p["loops"] for p in trained if p["kappa"] == 10.0] == [[config.grid.fixed_loops]]
  conditioned = reproduce.experiment_config(config, "linear_regression", 3, 12, 10.0, 2).linear
  isotropic = reproduce.experiment_config(config, "linear_regression", 3, 12, 1.0, 4).linear
  assert (conditioned.loss_loops, conditioned.loss_normalization) == (1, "none")
  assert (isotropic.loss_loops, isotropic.loss_normalization) == (4, "gd")
  for p in reproduce.points(config):
    changed = reproduce.fingerprint(config, p) != before[reproduce.point_id(p)]
    assert changed == (p["method"] == "trained" and p["kappa"] == 10.0), reproduce.point_id(p)
  config.grid.condition_train_mode = "sometimes"
  with pytest.raises(reproduce.GridError, match="grid.condition_train_mode"):
    reproduce.validate(config)


def test_script_bad_config_is_one_line_exit_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"),
       "--config", os.path.join(ROOT, "configs", "reproduce_quick.py"), "--workdir", str(tmp_path),
       "--config.grid.fixed_loops=13"],
      capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "grid.fixed_loops" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("field,value", [("epsilon", 0.0), ("step_shoulder", 0.9), ("scan_prompts", 4),
                                         ("validation_prompts", 8), ("tuned_max_d", 0),
                                         ("noise_stds", (-1.0,)), ("trained_ds", (7,)),
                                         ("ladder", ("cg", "lanczos")), ("loops", (1, 5000)),
                                         ("trained_n_over_d", (3.0,)), ("noise_kinds", ("images",))])
def test_grid_fields_of_the_regime_fail_in_one_line(field, value):
  config = tiny_grid()
  config.grid[field] = value
  with pytest.raises(reproduce.GridError, match=f"config.grid.{field}=") as err:
    reproduce.validate(config)
  assert "\n" not in str(err.value) and "allowed" in str(err.value)


def test_a_grid_config_missing_a_field_is_refused_naming_it():
  """Every grid field's default lives in configs/reproduce.py; a config without one is refused
  (no fallback default in the code)."""
  config = tiny_grid()
  del config.grid["weight_loops"]
  with pytest.raises(reproduce.GridError, match=r"config\.grid\.weight_loops is missing") as err:
    reproduce.validate(config)
  assert "\n" not in str(err.value)
