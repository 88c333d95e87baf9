"""A task family: everything about one kind of in-context task, behind one interface.

The training loop (loop.py), the workdir tools (run.py), the sweeps and the command line are
the same for every family; a family supplies the rest.  Adding one is a subclass and a
`registry.register` call — tests/test_family.py trains a toy family through `train_and_evaluate`
that way.

A family declares, before any instance exists (class level), its part of the config schema
(config.defaults(kind) assembles it; every field has its default there and nowhere else):
  * `kinds`                — the `task.kind` values it serves;
  * `task_config()`        — the `task` section, every field at its default;
  * `model_config()`       — the `model` section's fields besides the generic `loops`;
  * `section`, `section_config()` — the name and fields of its own section (the linear family's
                             `linear`: batch sampling and loss knobs only it interprets), or None;
  * `link(config)`         — defaults that follow other fields (FieldReferences), e.g. the step
                             count that follows T;
  * `shape_fields`         — dotted fields that fix the parameter shapes (resume refuses changes);
  * `validate(config)`     — checks its sections, raising errors.ConfigError with one line.

Bound to a config (`family = of(config, training=...)`; with `training=True` the family resolves
what a training step needs — the linear family's kernel — once, at construction):
  * `create_model(rngs)`   — the NNX module;
  * `trainable`            — an nnx filter: the variables the optimizer updates.  The training
                             path splits the model with it, so a variable outside it (the concept
                             family's fixed output layer) is never trained — whatever optimizer;
  * `sample(key, batch)`   — a batch of prompts, pure and jit-able;
  * `make_loss()`          — `loss(model, batch, loops) -> (scalar, {name: scalar})`, built when
                             the training step is built; the aux scalars are logged as train metrics;
  * `make_evaluator()`     — `evaluate(model) -> dict` on a fixed held-out set;
  * `log_extras(rlog, step, model, metrics)` — TensorBoard figures beyond the scalars;
  * `tensorboard_layout()`, `hparam_metrics` — the Custom Scalars charts and the scalar tags the
                             HParams tab compares runs by;
  * `summary_lines(result)` — the closing lines of a run;
  * `report(workdir, model, step, **options)` — the offline evaluation (scripts/evaluate.py).
"""
from __future__ import annotations

import abc

import ml_collections
from flax import nnx

from loopicl.errors import ConfigError

class Family(abc.ABC):
  """Base class of a task family (module docstring).  Defaults are what most families want;
  the abstract methods are what every family must supply (a subclass missing one cannot be
  instantiated)."""

  kinds: tuple[str, ...] = ()
  section: str | None = None
  shape_fields: tuple[str, ...] = ()
  trainable = nnx.Param

  # -- schema (class level) ----------------------------------------------------------------------
  @classmethod
  @abc.abstractmethod
  def task_config(cls) -> ml_collections.ConfigDict:
    """The default `task` section: every field (the schema of `task`)."""

  @classmethod
  def model_config(cls) -> ml_collections.ConfigDict:
    """The `model` section's fields besides `loops`, at their defaults."""
    return ml_collections.ConfigDict()

  @classmethod
  def section_config(cls) -> ml_collections.ConfigDict:
    """The fields of the family's own section `section` (when it has one), at their defaults."""
    return ml_collections.ConfigDict()

  @classmethod
  def link(cls, config) -> None:
    """Makes defaults that follow other fields FieldReferences of them (config.defaults)."""

  @classmethod
  def validate(cls, config) -> None:
    """Raises ConfigError (one line) for a bad field of this family's sections."""

  # -- bound to a config -------------------------------------------------------------------------
  def __init__(self, config, training: bool = False):
    self.config = config
    self.task = config.task
    self.training = training

  @abc.abstractmethod
  def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """See the module docstring."""

  @abc.abstractmethod
  def sample(self, key, batch_size: int):
    """See the module docstring."""

  @abc.abstractmethod
  def loss(self, model, batch, loops: int):
    """See the module docstring."""

  def make_loss(self):
    return self.loss

  @abc.abstractmethod
  def make_evaluator(self):
    """See the module docstring."""

  def log_extras(self, rlog, step: int, model, metrics: dict) -> None:
    pass

  hparam_metrics: tuple[str, ...] = ("train/loss",)

  def tensorboard_layout(self) -> dict:
    """{category: {chart: [tag regex, …]}} for TensorBoard's Custom Scalars tab."""
    return {"training": {"loss": ["train/loss"], "learning rate": ["train/learning_rate"],
                         "gradient norm": ["train/grad_norm"]}}

  def summary_lines(self, result: dict) -> list[str]:
    return [f"   {k:<30s}{v:.4g}" for k, v in sorted(result.items())
            if isinstance(v, float) and k != "train_loss"]

  def report(self, workdir: str, model, step: int, **options) -> dict:
    raise ConfigError(f"task.kind={self.task.kind!r} has no offline report; allowed: a run of a "
                      "family that has one (linear_regression | vector_generation | "
                      "concept_classification)")
