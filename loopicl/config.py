"""Validation of experiment configs: fail before any work, with one line naming the field.

An experiment config is a `ConfigDict` with sections `task`, `model`, `train`, `eval`,
`checkpoint` (see configs/default.py, where every field is commented).  `validate` checks every
field's type and range; `check_resumable` refuses to resume a run whose stored config differs in
a field that changes the shape of what the checkpoint holds.
"""
from __future__ import annotations

import numbers
import os

import ml_collections

from loopicl import tasks

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
LOSS_NORMALIZATIONS = ("none", "gd")
MODEL_INITS = ("random", "gd")  # model.init: random weights | the GD construction (step init_step) + noise
CONCEPT_KINDS = ("concept_classification",)
ATTENTION_FORMS = ("reassociated", "textbook")  # model.form: as loopicl.model.ATTENTION_FORMS
KERNELS = ("auto", "xla", "cpu")  # model.kernel: as loopicl.model.KERNELS

# Fields that fix the shapes of the parameters and optimizer state: a checkpoint written under one
# value cannot be restored under another.
SHAPE_FIELDS = ("task.kind", "task.d", "task.d_out", "model.parameterization",
                "model.mlp_width", "model.heads", "task.dim", "task.num_concepts", "train.optimizer")


class ConfigError(ValueError):
  """A config field holds a value it may not hold. Its message is one line."""


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def _int(cfg, section, name, low=1):
  v = cfg[section][name]
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    _fail(f"{section}.{name}", v, f"an integer >= {low}")


def _real(cfg, section, name, low=0.0, strict=False):
  v = cfg[section][name]
  ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
  if not ok or v < low or (strict and v == low):
    _fail(f"{section}.{name}", v, f"a finite number {'>' if strict else '>='} {low}")


def _choice(cfg, section, name, choices):
  v = cfg[section][name]
  if v not in choices:
    _fail(f"{section}.{name}", v, " | ".join(map(str, choices)))


def _bool(cfg, section, name):
  v = cfg[section][name]
  if not isinstance(v, bool):
    _fail(f"{section}.{name}", v, "True | False")


def _concept_task_fields():
  from loopicl import concepts
  return concepts.default_config().keys()


def load_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (configs/*.py are files, not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "loopicl_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def known_fields() -> dict:
  """Section -> allowed field names (a field in no family's schema is a typo)."""
  return {
      "task": set(tasks.default_config().keys()) | set(_concept_task_fields()),
      "model": {"parameterization", "loops", "init_scale", "remat", "unroll", "mlp_width",
                "heads", "attention_init_scale", "init", "init_step", "form", "kernel",
                "kernel_threads"},
      "train": {"seed", "steps", "batch_size", "optimizer", "learning_rate", "schedule",
                "warmup_steps", "grad_clip", "weight_decay", "momentum", "loss_loops",
                "loss_normalization", "curriculum_start", "curriculum_every",
                "curriculum_increment", "construction_steps", "steps_per_call", "log_every"},
      "eval": {"every", "num_prompts", "seed"},
      "checkpoint": {"every", "keep"},
      "": {"task", "model", "train", "eval", "checkpoint", "distributed", "cpu_devices"},
  }


def _check_known_fields(cfg) -> None:
  known = known_fields()
  for key in cfg.keys():
    if key not in known[""]:
      raise ConfigError(f"config.{key} is an unknown field; allowed: {' | '.join(sorted(known['']))}")
  for section, names in known.items():
    if section and section in cfg:
      if not isinstance(cfg[section], ml_collections.ConfigDict):
        raise ConfigError(f"config.{section}={cfg[section]!r} is invalid; allowed: a section of fields")
      for key in cfg[section].keys():
        if key not in names:
          raise ConfigError(f"config.{section}.{key} is an unknown field; allowed: "
                            f"{' | '.join(sorted(names))}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) with one line naming the first bad field."""
  for section in ("task", "model", "train", "eval", "checkpoint"):
    if section not in cfg:
      raise ConfigError(f"config.{section} is missing; a config needs task, model, train, eval, checkpoint")
  _check_known_fields(cfg)
  if cfg.task.kind in tasks.TASK_KINDS:
    try:
      tasks.validate(cfg.task)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  else:
    from loopicl import concepts  # the second paper's task family
    if cfg.task.kind not in CONCEPT_KINDS:
      _fail("task.kind", cfg.task.kind, " | ".join(tasks.TASK_KINDS + CONCEPT_KINDS))
    try:
      concepts.validate(cfg.task)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  _int(cfg, "model", "loops")
  _real(cfg, "model", "init_scale", 0.0, strict=True)
  _bool(cfg, "model", "remat")
  _int(cfg, "model", "unroll")
  if cfg.task.kind in tasks.TASK_KINDS:
    _choice(cfg, "model", "parameterization", ("full", "gd"))
  # Optional (configs written before they existed lack them): the GD warm start.
  if "init" in cfg.model:
    _choice(cfg, "model", "init", MODEL_INITS)
  if "init_step" in cfg.model:
    _real(cfg, "model", "init_step", 0.0, strict=True)
  if "form" in cfg.model:  # optional: configs written before it existed lack it
    _choice(cfg, "model", "form", ATTENTION_FORMS)
  if "kernel" in cfg.model:  # optional, as form
    _choice(cfg, "model", "kernel", KERNELS)
  if "kernel_threads" in cfg.model:
    _int(cfg, "model", "kernel_threads", low=0)
  if "cpu_devices" in cfg:
    v = cfg.cpu_devices
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
      _fail("cpu_devices", v, "an integer >= 0 (0: JAX's default device count)")
  if "distributed" in cfg and not isinstance(cfg.distributed, bool):
    _fail("distributed", cfg.distributed, "True | False")
  _int(cfg, "train", "seed", 0)
  _int(cfg, "train", "steps")
  _int(cfg, "train", "batch_size")
  _choice(cfg, "train", "optimizer", OPTIMIZERS)
  _real(cfg, "train", "learning_rate", 0.0, strict=True)
  _choice(cfg, "train", "schedule", SCHEDULES)
  _int(cfg, "train", "warmup_steps", 0)
  _real(cfg, "train", "grad_clip", 0.0)
  _real(cfg, "train", "weight_decay", 0.0)
  _real(cfg, "train", "momentum", 0.0)
  if cfg.train.momentum >= 1:
    _fail("train.momentum", cfg.train.momentum, "a number in [0, 1)")
  _int(cfg, "train", "loss_loops")
  if cfg.train.loss_loops > cfg.model.loops:
    _fail("train.loss_loops", cfg.train.loss_loops, f"an integer in [1, model.loops={cfg.model.loops}]")
  _choice(cfg, "train", "loss_normalization", LOSS_NORMALIZATIONS)
  if "construction_steps" in cfg.train:  # optional: configs written before it existed lack it
    _int(cfg, "train", "construction_steps", 0)
    if cfg.train.construction_steps > 0 and cfg.task.kind not in tasks.TASK_KINDS:
      _fail("train.construction_steps", cfg.train.construction_steps,
            f"0 for task.kind={cfg.task.kind!r} (the GD construction exists for "
            f"{' | '.join(tasks.TASK_KINDS)} only)")
  _int(cfg, "train", "steps_per_call")
  _int(cfg, "train", "curriculum_start", 0)
  if cfg.train.curriculum_start > cfg.model.loops:
    _fail("train.curriculum_start", cfg.train.curriculum_start, f"0 (off) or an integer in [1, model.loops={cfg.model.loops}]")
  _int(cfg, "train", "curriculum_every")
  _int(cfg, "train", "curriculum_increment")
  _int(cfg, "train", "log_every")
  _int(cfg, "eval", "every")
  _int(cfg, "eval", "num_prompts")
  _int(cfg, "eval", "seed", 0)
  _int(cfg, "checkpoint", "every")
  _int(cfg, "checkpoint", "keep")


def _get(cfg, dotted):
  node = cfg
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def shape_field_differences(stored: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """The SHAPE_FIELDS whose values differ between a stored config (dict) and `cfg`."""
  stored = ml_collections.ConfigDict(stored)
  return [f for f in SHAPE_FIELDS if _get(stored, f) != _get(cfg, f)]


def differences(stored: dict, cfg: ml_collections.ConfigDict, prefix="") -> list[str]:
  """Every dotted field whose value differs (added and removed fields included)."""
  out = []
  new = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
  for key in sorted(set(stored) | set(new)):
    a, b = stored.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out
