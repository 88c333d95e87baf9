"""The training job: exact resume, signals, corrupt checkpoints, NaN, TensorBoard, config errors."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from loopicl import checkpointing, config as config_lib, run, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")
TINY_OVERRIDES = {
    "task.d": 3, "task.n_context": 8, "model.loops": 2, "train.batch_size": 16,
    "train.steps": 60, "train.steps_per_call": 10, "train.log_every": 10, "train.warmup_steps": 5,
    "eval.every": 20, "eval.num_prompts": 64, "checkpoint.every": 20, "checkpoint.keep": 3,
    "train.curriculum_start": 0,  # T from the first step (the default curriculum adds a loop per 100)
    "linear.tail_pool": "2",  # tail-holding batches as by default, from 2× (not 8×) the candidates:
                              # the candidate draw dominated these tiny runs
}


def _load_default():
  return config_lib.load_file(DEFAULT_CONFIG)


def tiny_config(**overrides):
  c = _load_default()
  for k, v in {**TINY_OVERRIDES, **overrides}.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def _run(config, workdir):
  return train.train_and_evaluate(config, str(workdir), log=lambda *a: None, progress=False)


def _final_params(workdir):
  _, model, step = run.load_trained(str(workdir))
  return step, {k: np.asarray(v) for k, v in zip("PQ", model.weights())}


def _metrics_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return f.read().splitlines()


def _assert_same_run(a, b):
  step_a, params_a = _final_params(a)
  step_b, params_b = _final_params(b)
  assert step_a == step_b
  for k in params_a:
    assert np.array_equal(params_a[k], params_b[k]), k  # bit for bit
  assert _metrics_lines(a) == _metrics_lines(b)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted tiny run: the result every interrupted run must reproduce exactly."""
  workdir = tmp_path_factory.mktemp("reference")
  result = _run(tiny_config(), workdir)
  return workdir, result


def test_run_writes_everything_and_learns(reference_run):
  workdir, result = reference_run
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40", "60"]
  lines = [json.loads(l) for l in _metrics_lines(workdir)]
  assert [r["step"] for r in lines] == [20, 40, 60]
  for key in ("train_loss", "test_error", "test_error_per_loop", "gd_error", "gd_ratio", "weight_distance"):
    assert key in lines[-1]
  assert len(lines[-1]["test_error_per_loop"]) == 2
  assert lines[-1]["gd_ratio"] == pytest.approx(lines[-1]["test_error"] / lines[-1]["gd_error"])
  assert lines[-1]["test_error"] < lines[0]["test_error"]  # it learns
  stored = json.load(open(workdir / "config.json"))
  assert stored["model"]["loops"] == 2 and stored["task"]["d"] == 3
  assert result["step"] == 60 and result["test_error"] == lines[-1]["test_error"]


def test_tensorboard_has_scalars_images_and_config(reference_run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir, _ = reference_run
  acc = EventAccumulator(str(workdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
  acc.Reload()
  scalars = set(acc.Tags()["scalars"])
  for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/steps_per_s",
              "eval/test_error", "eval/gd_error", "eval/gd_ratio", "eval/weight_distance",
              "eval/per_loop/test_error_loop_01", "eval/per_loop/test_error_loop_02"):
    assert tag in scalars, tag
  assert [e.step for e in acc.Scalars("eval/test_error")] == [20, 40, 60]
  assert "weights/P_Q_vs_construction" in acc.Tags()["images"]
  assert any("config" in t for t in acc.Tags()["tensors"])


def test_loss_window_normalization_and_curriculum_train(tmp_path):
  """The loss options of issue 5 run through the jitted step and keep the loss finite."""
  result = _run(tiny_config(**{"model.loops": 4, "linear.loss_loops": 3, "linear.loss_normalization": "gd",
                               "train.curriculum_start": 1, "train.curriculum_every": 10,
                               "train.steps": 40, "eval.every": 40, "checkpoint.every": 40}), tmp_path / "opts")
  assert result["step"] == 40 and np.isfinite(result["test_error"])
  assert len(result["test_error_per_loop"]) == 4


def test_resume_after_finish_changes_nothing(reference_run, tmp_path):
  """Launching a finished run again trains nothing and rewrites no metrics."""
  import shutil
  workdir = tmp_path / "again"
  shutil.copytree(reference_run[0], workdir)
  before = _metrics_lines(workdir)
  result = _run(tiny_config(), workdir)
  assert result["step"] == 60 and _metrics_lines(workdir) == before


def _corrupt(workdir, how):
  step_dir = workdir / "checkpoints" / "60"
  files = [f for f in glob.glob(str(step_dir / "state" / "**" / "*"), recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  if how == "flipped_bytes":
    data = bytearray(open(biggest, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    open(biggest, "wb").write(bytes(data))
  elif how == "truncated":
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  else:  # an empty step folder where the newest checkpoint was
    import shutil
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["flipped_bytes", "truncated", "empty_folder"])
def test_corrupt_latest_checkpoint_is_skipped_and_run_ends_identical(reference_run, tmp_path, how):
  workdir = tmp_path / how
  _run(tiny_config(), workdir)
  _corrupt(workdir, how)
  lines = []
  train.train_and_evaluate(tiny_config(), str(workdir), log=lines.append, progress=False)
  warned = [l for l in lines if l.startswith("warning:")]  # one line per skipped checkpoint
  assert len(warned) == 1 and warned[0].startswith("warning: checkpoint at step 60 is unusable (")
  assert sum(l.startswith("moved unusable checkpoint 60 to ") for l in lines) == 1
  _assert_same_run(reference_run[0], workdir)
  assert os.listdir(workdir / "checkpoints_corrupt")  # moved aside, not deleted


def test_checksum_detects_modified_array(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "c"), keep=2)
  state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
  ckpt.save(1, state)
  ckpt.save(2, {"w": state["w"] + 1, "b": state["b"]})
  assert ckpt.restore_latest(state, log=lambda *a: None)[0] == 2
  assert checkpointing.tree_checksum(state) != checkpointing.tree_checksum({"w": state["w"] + 1e-7, "b": state["b"]})
  ckpt.close()


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "nan"
  _run(tiny_config(**{"train.steps": 20}), workdir)
  before = {f: open(f, "rb").read() for f in glob.glob(str(workdir / "checkpoints" / "**" / "*"), recursive=True)
            if os.path.isfile(f)}
  with pytest.raises(train.RunError, match=r"non-finite loss or gradient at step \d+.*Last good checkpoint: step 20"):
    _run(tiny_config(**{"train.steps": 60, "train.learning_rate": 1e4, "train.grad_clip": 0.0,
                        "train.schedule": "constant", "train.warmup_steps": 0}), workdir)
  after = {f: open(f, "rb").read() for f in glob.glob(str(workdir / "checkpoints" / "**" / "*"), recursive=True)
           if os.path.isfile(f)}
  assert after == before
  assert run.load_trained(str(workdir))[2] == 20


def test_a_config_missing_a_field_is_refused_naming_it(tmp_path):
  """Every field has its default in the schema (config.defaults); a config without one would
  silently train another recipe, so it is refused before any work."""
  config = tiny_config()
  del config.train["adam_b2"]
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.adam_b2 is missing") as info:
    _run(config, tmp_path / "missing")
  assert "\n" not in str(info.value) and not (tmp_path / "missing").exists()


def test_a_run_directory_of_another_release_is_refused_and_kept(tmp_path):
  """A workdir whose config.json has other fields (an older release: train.construction_steps,
  no linear section) is refused in one line naming them; nothing in it is touched."""
  workdir = tmp_path / "old"
  _run(tiny_config(**{"train.steps": 20}), workdir)
  stored = json.loads((workdir / "config.json").read_text())
  stored["train"]["construction_steps"] = -1
  stored["train"]["tail_pool"] = stored.pop("linear")["tail_pool"]
  (workdir / "config.json").write_text(json.dumps(stored))
  before = sorted(os.listdir(workdir)), _metrics_lines(workdir)
  with pytest.raises(train.RunError, match="another release") as info:
    _run(tiny_config(**{"train.steps": 40}), workdir)
  message = str(info.value)
  assert "\n" not in message and "train.construction_steps" in message and "linear.tail_pool" in message
  assert (sorted(os.listdir(workdir)), _metrics_lines(workdir)) == before
  assert json.loads((workdir / "config.json").read_text()) == stored


def test_shape_change_refused_harmless_change_allowed(tmp_path):
  workdir = tmp_path / "shape"
  _run(tiny_config(**{"train.steps": 20}), workdir)
  with pytest.raises(train.RunError, match="task.d"):
    _run(tiny_config(**{"train.steps": 20, "task.d": 4}), workdir)
  result = _run(tiny_config(**{"train.steps": 40}), workdir)  # more steps: resume and go on
  assert result["step"] == 40
  assert glob.glob(str(workdir / "config.*.json"))  # the previous config is kept


@pytest.mark.parametrize("overrides,field", [
    ({"model.loops": 0}, "config.model.loops"),
    ({"task.condition_number": 0.5}, "config.task.condition_number"),
    ({"task.noise_std": -0.1}, "config.task.noise_std"),
    ({"train.batch_size": 0}, "config.train.batch_size"),
    ({"train.optimizer": "adagrad"}, "config.train.optimizer"),
    ({"linear.loss_loops": 5}, "config.linear.loss_loops"),
    ({"linear.tail_pool": "0"}, "config.linear.tail_pool"),
    ({"linear.tail_pool": "many"}, "config.linear.tail_pool"),
    ({"model.parameterization": "masked"}, "config.model.parameterization"),
])
def test_invalid_values_fail_before_any_work(tmp_path, overrides, field):
  workdir = tmp_path / "bad"
  with pytest.raises(config_lib.ConfigError, match="allowed") as info:
    _run(tiny_config(**overrides), workdir)
  assert str(info.value).startswith(field) and "\n" not in str(info.value)
  assert not workdir.exists()


def test_unknown_field_in_config_is_refused(tmp_path):
  c = tiny_config()
  c.train.lerning_rate = 0.1
  with pytest.raises(config_lib.ConfigError, match="config.train.lerning_rate is an unknown field"):
    _run(c, tmp_path / "x")


def test_command_line_overrides_reach_the_config():
  argv = [sys.argv[0], f"--config={DEFAULT_CONFIG}", "--config.model.loops=20",
          "--config.train.steps=5000", "--config.task.kind=vector_generation"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert fv.config.model.loops == 20 and fv.config.train.steps == 5000
  assert fv.config.task.kind == "vector_generation"


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, **kw)


def _tiny_flags(**overrides):
  return [f"--config={DEFAULT_CONFIG}", "--progress=false"] + [
      f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]


def test_cli_errors_are_one_line_without_traceback(tmp_path):
  out = _cli(_tiny_flags(**{"model.loops": 0}) + [f"--workdir={tmp_path / 'w'}"])
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: config.model.loops=0 is invalid; allowed:")
  assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()
  out = _cli(_tiny_flags() + ["--config.train.lerning_rate=0.1", f"--workdir={tmp_path / 'w'}"])
  assert out.returncode != 0 and "Traceback" not in out.stderr and "lerning_rate" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_interrupted_cli_run_resumes_bit_identical(tmp_path, sig):
  """Interrupt a real training process after its first checkpoint, restart it, compare."""
  overrides = {"train.steps": 1500, "eval.every": 500, "checkpoint.every": 100, "checkpoint.keep": 50}
  reference = tmp_path / "reference"
  _run(tiny_config(**overrides), reference)
  workdir = tmp_path / "interrupted"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                           *_tiny_flags(**overrides), f"--workdir={workdir}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 120
  while not (workdir / "checkpoints" / "100").exists() and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=120)
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert steps and steps[-1] < 1500, "the run finished before it could be interrupted"
  if sig == signal.SIGTERM:
    assert proc.returncode == 0, stderr
    assert "SIGTERM: saved a checkpoint at step" in stdout + stderr
  out = _cli(_tiny_flags(**overrides) + [f"--workdir={workdir}"])
  assert out.returncode == 0, out.stderr
  assert "resumed from checkpoint at step" in out.stdout
  _assert_same_run(reference, workdir)
