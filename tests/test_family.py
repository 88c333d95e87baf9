"""A task family is one registration: a toy third family trains through the real training path
(checkpoints, TensorBoard, metrics.jsonl, resume), and what is trainable is the family's decision,
enforced on that path (a non-Param variable never moves, whatever the optimizer)."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from loopicl import config as config_lib, errors, family as family_lib, registry, run, train
from tests.test_train import DEFAULT_CONFIG


class Offset(nnx.Variable):
  """A deliberately non-trainable variable (not an nnx.Param)."""


class MeanModel(nnx.Module):
  """Predicts the mean of a prompt's context as scale · mean(x) + offset."""

  def __init__(self, rngs):
    self.scale = nnx.Param(0.1 * jax.random.normal(rngs.params(), ()))
    self.offset = Offset(jnp.asarray(0.0))

  def __call__(self, x):  # x: [batch, n] -> [batch]
    return self.scale[...] * jnp.mean(x, axis=-1) + self.offset[...]


@pytest.fixture
def toy_family():
  """Context x_i ~ N(μ, 1), μ ~ N(0, 1); target μ.  The whole family, in a few lines."""

  class MeanEstimation(family_lib.Family):
    kinds = ("toy_mean_estimation",)
    shape_fields = ("task.n_context",)

    @classmethod
    def task_config(cls):
      return ml_collections.ConfigDict({"kind": "toy_mean_estimation", "n_context": 16})

    @classmethod
    def validate(cls, cfg):
      config_lib.field_int(cfg, "task", "n_context")

    def create_model(self, rngs):
      return MeanModel(rngs)

    def sample(self, key, batch_size):
      k_mu, k_x = jax.random.split(key)
      mu = jax.random.normal(k_mu, (batch_size,))
      return mu, mu[:, None] + jax.random.normal(k_x, (batch_size, int(self.task.n_context)))

    def loss(self, model, batch, loops):
      mu, x = batch
      err = jnp.mean(jnp.square(model(x) - mu))
      return err, {"abs_scale_error": jnp.abs(model.scale[...] - 1.0)}

    def make_evaluator(self):
      mu, x = self.sample(jax.random.key(int(self.config.eval.seed)), 256)
      return lambda model: {"test_error": float(jnp.mean(jnp.square(model(x) - mu))),
                            "scale": float(model.scale[...])}

  registry.register(MeanEstimation)
  yield MeanEstimation
  registry.unregister(MeanEstimation)


def _toy_config(steps=60):
  c = config_lib.defaults("toy_mean_estimation")  # the schema: generic sections + the toy's task
  c.model.loops = 1
  c.train.steps, c.train.steps_per_call, c.train.log_every = steps, 10, 10
  c.train.learning_rate, c.train.warmup_steps = 0.1, 5
  c.train.curriculum_start = 0
  c.eval.every, c.checkpoint.every = 20, 20
  return c


def test_a_toy_family_trains_through_train_and_evaluate(toy_family, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir = tmp_path / "toy"
  result = train.train_and_evaluate(_toy_config(), str(workdir), log=lambda *a: None,
                                    progress=False)
  # It learns the estimator (scale → 1: the exact mean; error → 1/n·(noise) + …).
  assert result["step"] == 60 and abs(result["scale"] - 1.0) < 0.2
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [20, 40, 60]
  assert lines[-1]["test_error"] < lines[0]["test_error"]
  assert "train_abs_scale_error" in lines[-1]  # the family's train metrics are logged
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40", "60"]
  acc = EventAccumulator(str(workdir))
  acc.Reload()
  for tag in ("train/loss", "train/abs_scale_error", "eval/test_error", "eval/scale"):
    assert tag in acc.Tags()["scalars"], tag
  # The non-trainable variable is not in the checkpoint and never moved.
  config, model, step = run.load_trained(str(workdir))
  assert step == 60 and float(model.offset[...]) == 0.0
  assert float(model.scale[...]) == pytest.approx(result["scale"])
  text = run.summary(result, config)
  assert "toy_mean_estimation" in text and "test_error" in text and "scale" in text


def test_the_family_decides_what_is_trainable(toy_family, tmp_path):
  """An offset that the gradient would move (targets shifted by +3) stays put when the family
  excludes it, and trains when the family includes it — on the same training path."""

  class Shifted(toy_family):
    kinds = ("toy_shifted",)

    @classmethod
    def task_config(cls):
      return ml_collections.ConfigDict({"kind": "toy_shifted", "n_context": 16})

    def sample(self, key, batch_size):
      mu, x = super().sample(key, batch_size)
      return mu + 3.0, x

  class ShiftedAllTrainable(Shifted):
    kinds = ("toy_shifted_all",)
    trainable = (nnx.Param, Offset)

    @classmethod
    def task_config(cls):
      return ml_collections.ConfigDict({"kind": "toy_shifted_all", "n_context": 16})

  offsets = {}
  for fam in (Shifted, ShiftedAllTrainable):
    registry.register(fam)
    try:
      c = _toy_config(steps=40)
      c.task.kind = fam.kinds[0]
      train.train_and_evaluate(c, str(tmp_path / fam.kinds[0]), log=lambda *a: None,
                               progress=False)
      offsets[fam.kinds[0]] = float(run.load_trained(str(tmp_path / fam.kinds[0]))[1].offset[...])
    finally:
      registry.unregister(fam)
  assert offsets["toy_shifted"] == 0.0          # excluded: bit for bit at its initial value
  assert offsets["toy_shifted_all"] > 0.5       # included: the same path trains it
  # The concept family's fixed ±1/m output layer on the same path: tests/test_concept_run.py
  # (test_output_layer_stays_fixed_through_training, on the run its module already trains).


def test_unknown_kind_is_one_line_naming_the_registered_kinds():
  c = config_lib.load_file(DEFAULT_CONFIG)
  c.task.kind = "nope"
  with pytest.raises(errors.ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert "\n" not in message and "config.task.kind='nope'" in message
  for kind in ("linear_regression", "vector_generation", "concept_classification"):
    assert kind in message


def test_registering_a_kind_twice_is_refused(toy_family):
  class Other(family_lib.Family):
    kinds = ("toy_mean_estimation",)
  with pytest.raises(ValueError, match="already registered"):
    registry.register(Other)
