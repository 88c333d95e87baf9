"""A task family: everything about one kind of in-context task, behind one interface.

The training loop (train.py), the workdir tools (run.py), the sweeps and the command line are
the same for every family; a family supplies the rest.  Adding one is a subclass and a
`register` call — tests/test_family.py trains a toy family through `train_and_evaluate` that way.

A family declares, before any instance exists (class level):
  * `kinds`                — the `task.kind` values it serves;
  * `task_config()`        — the default `task` section (every field: the schema of `task`);
  * `model_fields`         — the names allowed in the `model` section besides the generic `loops`;
  * `shape_fields`         — dotted fields that fix the parameter shapes (resume refuses changes);
  * `validate(config)`     — checks its `task` and `model` sections (and any train field only it
                             interprets), raising errors.ConfigError with one line.

Bound to a config (`family = get(config.task.kind)(config)`):
  * `create_model(rngs)`   — the NNX module;
  * `trainable`            — an nnx filter: the variables the optimizer updates.  The training
                             path splits the model with it, so a variable outside it (the concept
                             family's fixed output layer) is never trained — whatever optimizer;
  * `sample(key, batch)`   — a batch of prompts, pure and jit-able;
  * `make_loss()`          — `loss(model, batch, loops) -> (scalar, {name: scalar})`, built when
                             the training step is built (the linear family resolves its kernel
                             there); the aux scalars are logged as train metrics;
  * `optimizer_extra()`    — an optax transformation chained after the optimizer, or None;
  * `make_evaluator()`     — `evaluate(model) -> dict` on a fixed held-out set;
  * `log_extras(rlog, step, model, metrics)` — TensorBoard figures beyond the scalars;
  * `tensorboard_layout()`, `hparam_metrics` — the Custom Scalars charts and the scalar tags the
                             HParams tab compares runs by;
  * `summary_lines(result)` — the closing lines of a run;
  * `report(workdir, model, step, **options)` — the offline evaluation (scripts/evaluate.py).
"""
from __future__ import annotations

import abc
import importlib

import ml_collections
from flax import nnx

from loopicl.errors import ConfigError

# Modules whose import registers the built-in families (imported on the first lookup, so that
# importing loopicl does not import every family's dependencies).
BUILTIN = ("loopicl.linear.family", "loopicl.concepts.family")

_REGISTRY: dict[str, type["Family"]] = {}


class Family(abc.ABC):
  """Base class of a task family (module docstring).  Defaults are what most families want;
  the abstract methods are what every family must supply (a subclass missing one cannot be
  instantiated)."""

  kinds: tuple[str, ...] = ()
  model_fields: frozenset[str] = frozenset()
  shape_fields: tuple[str, ...] = ()
  trainable = nnx.Param

  # -- schema (class level) ----------------------------------------------------------------------
  @classmethod
  @abc.abstractmethod
  def task_config(cls) -> ml_collections.ConfigDict:
    """The default `task` section: every field (the schema of `task`)."""

  @classmethod
  def validate(cls, config) -> None:
    """Raises ConfigError (one line) for a bad `task`/`model` field of this family."""

  # -- bound to a config -------------------------------------------------------------------------
  def __init__(self, config):
    self.config = config
    self.task = config.task

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

  def optimizer_extra(self):
    return None

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
    raise ConfigError(f"task.kind={self.task.kind!r} has no offline report; allowed: "
                      f"{' | '.join(k for f in families() if f.report is not Family.report for k in f.kinds)}")


def register(family: type[Family]) -> type[Family]:
  """Adds `family` for each of its kinds (usable as a class decorator); a kind registered twice
  by different classes is an error, re-registering the same class is not."""
  if not family.kinds:
    raise ValueError(f"{family.__name__}.kinds is empty; allowed: a tuple of task.kind names")
  for kind in family.kinds:
    other = _REGISTRY.get(kind)
    if other is not None and other.__qualname__ != family.__qualname__:
      raise ValueError(f"task.kind={kind!r} is already registered by {other.__name__}")
    _REGISTRY[kind] = family
  return family


def unregister(family: type[Family]) -> None:
  for kind in family.kinds:
    if _REGISTRY.get(kind) is family:
      del _REGISTRY[kind]


def _load_builtins() -> None:
  for module in BUILTIN:
    importlib.import_module(module)


def kinds() -> tuple[str, ...]:
  """Every registered task.kind, built-ins first."""
  _load_builtins()
  return tuple(_REGISTRY)


def families() -> list[type[Family]]:
  _load_builtins()
  return list(dict.fromkeys(_REGISTRY.values()))


def get(kind) -> type[Family]:
  """The family class of `kind`; ConfigError naming task.kind and the registered kinds."""
  _load_builtins()
  family = _REGISTRY.get(kind) if isinstance(kind, str) else None
  if family is None:
    raise ConfigError(f"config.task.kind={kind!r} is invalid; allowed: {' | '.join(_REGISTRY)}")
  return family


def of(config) -> Family:
  """The family of `config`, bound to it."""
  return get(config.task.kind)(config)
