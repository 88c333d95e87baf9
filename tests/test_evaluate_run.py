"""evaluate_run on a run directory that holds the GD construction (saved, not trained), and the
command line's one-line errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from loopicl import checkpointing, optim, registry, run
from loopicl.linear import construction, family as linear_family
from tests.test_train import tiny_config


def _config(**overrides):
  """A tiny run's config with every entry of P and Q a parameter (the GD construction is saved)."""
  return tiny_config(**{"model.parameterization": "full", **overrides})

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP, ETA = 40, 0.35


def _save_construction(workdir, config, step=STEP, eta=ETA):
  """Writes config.json and a checkpoint whose params are the GD construction with step η.

  The state has the training loop's layout {params, opt_state, data_key} (step.make_train_step),
  so run.load_trained restores it like any checkpoint of a real run.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  model = registry.of(config).create_model(nnx.Rngs(params=0))
  P, Q = construction.gd_params(config.task.d, config.task.d_out, step_size=eta, dtype=model.P[...].dtype)
  model.P[...], model.Q[...] = P, Q
  params = nnx.to_pure_dict(nnx.split(model)[1])
  state = {"params": params, "opt_state": optim.make_optimizer(config.train).init(params),
           "data_key": jax.random.key_data(jax.random.key(0))}
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  ckpt.save(step, state)
  ckpt.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  _save_construction(workdir, _config())
  return workdir


def test_evaluate_run_on_saved_construction(run_dir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  report = run.evaluate_run(run_dir, loops_max=6, num_prompts=128, log=lambda *a: None)
  T = _config().model.loops
  assert report["trained_loops"] == T and report["loops"] == list(range(1, 7))
  assert report["run"]["step"] == STEP and report["run"]["parameterization"] == "full"
  assert report["weight_distance"] < 1e-3 and report["offblock_fraction"] < 1e-3  # float32 weights
  assert report["gd_step_equivalent"] == pytest.approx(ETA, rel=1e-6)
  eval_dir = os.path.join(run_dir, "eval")
  with open(os.path.join(eval_dir, "report.json")) as f:
    assert json.load(f)["model_error"] == report["model_error"]
  for name in ("report.md", "errors.png", "weights.png", "preconditioner.png", "interpolation.png",
               "sensitivity.png", "weights.npz"):
    assert os.path.getsize(os.path.join(eval_dir, name)) > 0, name
  np.testing.assert_allclose(np.load(os.path.join(eval_dir, "weights.npz"))["Q"][:3, :3],
                             -ETA * np.eye(3), rtol=1e-6)
  acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  assert [e.step for e in acc.Scalars("analysis/weight_distance")] == [STEP]
  assert "analysis/errors" in acc.Tags()["images"]
  assert linear_family.default_loops_max(5) == 40 and linear_family.default_loops_max(30) == 120


def test_evaluate_run_errors(tmp_path, run_dir):
  with pytest.raises(run.RunError, match="no config.json"):
    run.evaluate_run(str(tmp_path / "missing"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(_config().to_dict()))
  with pytest.raises(run.RunError, match="no checkpoint"):
    run.evaluate_run(str(empty))
  # A checkpoint of another shape (d = 4) under a d = 3 config does not restore.
  other = str(tmp_path / "other")
  _save_construction(other, _config(**{"task.d": 4}))
  (tmp_path / "other" / "config.json").write_text(json.dumps(_config().to_dict()))
  lines = []
  with pytest.raises(run.RunError, match="can be restored"):
    run.evaluate_run(other, log=lines.append)
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint at step ")  # one line each
  # Reading a run never moves or deletes its checkpoints, even unusable ones.
  assert os.listdir(os.path.join(other, "checkpoints")) and not os.path.exists(other + "/checkpoints_corrupt")
  with pytest.raises(ValueError, match="loops_max"):
    run.evaluate_run(run_dir, loops_max=1, num_prompts=16, log=lambda *a: None)


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("args,expected", [
    (["--workdir={missing}"], "no config.json"),
    (["--workdir={run}", "--num_prompts=0"], "num_prompts=0 is invalid"),
    (["--workdir={run}", "--loops_max=abc"], "bad command-line flag"),
    ([], "--workdir is required"),
])
def test_cli_errors_are_one_line(tmp_path, run_dir, args, expected):
  out = _cli(*(a.format(missing=tmp_path / "nope", run=run_dir) for a in args))
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and expected in lines[-1], out.stderr


def test_evaluating_a_run_builds_no_kernel(run_dir, monkeypatch):
  """The run's config asks for model.kernel='auto' (the fused CPU kernel on this machine), but
  evaluation only reads the weights: resolving, building or calling the kernel is an error."""
  from loopicl import kernels

  def refuse(*args, **kwargs):
    raise AssertionError("evaluating a run touched the fused kernel")

  monkeypatch.setattr(kernels, "lanes", refuse)
  monkeypatch.setattr(kernels, "fused_readouts", refuse)
  assert run.load_config(run_dir).model.kernel == "auto"
  report = run.evaluate_run(run_dir, loops_max=3, num_prompts=32, log_tensorboard=False,
                            log=lambda *a: None)
  assert report["trained_loops"] == 2 and report["run"]["step"] == STEP
