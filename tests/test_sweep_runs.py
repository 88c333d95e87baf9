"""scripts/sweep.py: swept fields × seeds, vmapped per point, each seed an ordinary run directory
that equals its own single run; resumable; bad --sweep flags are one line."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from loopicl import errors, run, train
from loopicl.experiments import sweep_runs
from tests.test_train import DEFAULT_CONFIG, ROOT, tiny_config


def _params(workdir):
  _, model, step = run.load_trained(str(workdir), log=lambda *a: None)
  return step, [np.asarray(w) for w in model.weights()]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep")
  config = tiny_config(**{"train.steps": 40})
  sweeps = sweep_runs.parse_sweeps(["model.loops=1,2"], config)
  rows = sweep_runs.run(config, sweeps, [0, 1], str(workdir), log=lambda *a: None)
  return workdir, config, sweeps, rows


def test_each_seed_is_the_run_train_py_makes(sweep_dir, tmp_path):
  workdir, config, sweeps, rows = sweep_dir
  assert [(r["point"]["model.loops"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
  with open(workdir / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4 and {"model.loops", "seed", "test_error", "gd_ratio"} <= set(table[0])
  assert (workdir / "sweep.png").exists() and (workdir / "sweep.pdf").exists()
  assert "| 2 |" in (workdir / "summary.md").read_text()
  seed_dir = workdir / "model.loops=2" / "seed1"
  assert sorted(os.listdir(seed_dir / "checkpoints")) == ["20", "40"]
  single = tiny_config(**{"train.steps": 40, "model.loops": 2, "train.seed": 1})
  result = train.train_and_evaluate(single, str(tmp_path / "single"), log=lambda *a: None,
                                    progress=False)
  step, swept = _params(seed_dir)
  _, alone = _params(tmp_path / "single")
  assert step == 40
  for a, b in zip(swept, alone):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # vmapped vs single: float rounding
  assert rows[3]["metrics"]["test_error"] == pytest.approx(result["test_error"], rel=1e-4)
  assert run.load_config(str(seed_dir)).train.seed == 1


def test_rerun_resumes_from_the_common_checkpoint(sweep_dir):
  """A sweep killed between two seeds' saves: seed 1 lacks its last checkpoint.  The rerun
  restores both seeds at their common step, retrains, and ends where the first run ended."""
  workdir, config, sweeps, _ = sweep_dir
  point = workdir / "model.loops=1"
  before = {s: _params(point / f"seed{s}")[1] for s in (0, 1)}
  metrics_before = (point / "seed1" / "metrics.jsonl").read_text()
  shutil.rmtree(point / "seed1" / "checkpoints" / "40")
  os.remove(workdir / "points" / "model.loops=1.json")  # killed mid-point: no record yet
  lines = []
  sweep_runs.run(config, sweeps, [0, 1], str(workdir), log=lines.append)
  for s in (0, 1):
    step, after = _params(point / f"seed{s}")
    assert step == 40
    for a, b in zip(before[s], after):
      np.testing.assert_array_equal(a, b)  # bit for bit: the same program from the same state
  assert (point / "seed1" / "metrics.jsonl").read_text() == metrics_before


@pytest.mark.parametrize("flag,message", [
    ("--sweep=model.loops", "--sweep='model.loops' is invalid"),
    ("--sweep=model.lops=1,2", "config.model.lops does not exist"),
    ("--sweep=model.loops=1,x", "allowed: a int"),
])
def test_bad_sweep_flags_are_one_line(tmp_path, flag, message):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"),
                         f"--config={DEFAULT_CONFIG}", flag, f"--workdir={tmp_path / 'w'}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
  assert not (tmp_path / "w").exists()  # refused before any work


def test_parse_sweeps_types_and_refusals():
  config = tiny_config()
  assert sweep_runs.parse_sweeps(["train.learning_rate=1e-3,3e-3", "model.remat=true"], config) == [
      ("train.learning_rate", [1e-3, 3e-3]), ("model.remat", [True])]
  with pytest.raises(errors.ConfigError, match="swept twice"):
    sweep_runs.parse_sweeps(["model.loops=1", "model.loops=2"], config)
  with pytest.raises(errors.ConfigError, match="model.loops=0 is invalid"):
    sweep_runs.point_config(config, {"model.loops": 0})


def test_first_seed_sets_the_seeds_of_every_point(tmp_path):
  """--first_seed=5 --seeds=2: seeds 5 and 6 (a recipe is chosen on seeds a study does not report)."""
  tiny = ["--config.task.d=3", "--config.task.n_context=8", "--config.train.steps=10",
          "--config.train.batch_size=16", "--config.train.steps_per_call=10",
          "--config.train.log_every=10", "--config.eval.every=10", "--config.eval.num_prompts=64",
          "--config.checkpoint.every=10", "--config.train.curriculum_start=0",
          "--config.linear.tail_pool=2", "--config.train.warmup_steps=2"]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"),
                         f"--config={DEFAULT_CONFIG}", "--sweep=model.loops=1", "--seeds=2",
                         "--first_seed=5", f"--workdir={tmp_path / 'w'}", *tiny],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "w" / "sweep.csv") as f:
    assert [r["seed"] for r in csv.DictReader(f)] == ["5", "6"]
  assert sorted(os.listdir(tmp_path / "w" / "model.loops=1")) == ["seed5", "seed6"]
  assert run.load_config(str(tmp_path / "w" / "model.loops=1" / "seed6")).train.seed == 6
