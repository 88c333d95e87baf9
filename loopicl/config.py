"""Validation of experiment configs: fail before any work, with one line naming the field.

An experiment config is a `ConfigDict` with sections `task`, `model`, `train`, `eval`,
`checkpoint` (configs/default.py comments every field).  This module checks the generic
sections (`train`, `eval`, `checkpoint`, the top-level fields and `model.loops`); the task family
of `task.kind` (family.py) supplies the schema of `task` and `model` and checks them.
`shape_field_differences` refuses to resume a run whose stored config differs in a field that
changes the shape of what the checkpoint holds.

The `field_*` checkers are shared with the families: `field_int(cfg, "model", "loops")` raises
ConfigError("config.model.loops=0 is invalid; allowed: an integer >= 1").
"""
from __future__ import annotations

import importlib.util
import numbers
import os

import ml_collections

from loopicl import family as family_lib
from loopicl.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "soap")
SCHEDULES = ("constant", "cosine")
LOSS_NORMALIZATIONS = ("none", "gd")

GENERIC_FIELDS = {
    "model": {"loops"},
    "train": {"seed", "steps", "batch_size", "optimizer", "learning_rate", "schedule",
              "warmup_steps", "grad_clip", "weight_decay", "momentum", "loss_loops",
              "loss_normalization", "curriculum_start", "curriculum_every",
              "curriculum_increment", "construction_steps", "tail_pool", "tail_prompts",
              "shampoo_decay", "precondition_every", "nonfinite_skips", "adam_eps",
              "adam_b2",
              "steps_per_call", "log_every"},
    "eval": {"every", "num_prompts", "seed", "extrapolation"},
    "checkpoint": {"every", "keep"},
    "": {"task", "model", "train", "eval", "checkpoint", "distributed", "cpu_devices"},
}
# Fields that fix the shape of the optimizer state, whatever the family.
SHAPE_FIELDS = ("task.kind", "train.optimizer")


def fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def field_int(cfg, section, name, low=1):
  v = cfg[section][name]
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    fail(f"{section}.{name}", v, f"an integer >= {low}")


def field_real(cfg, section, name, low=0.0, strict=False):
  v = cfg[section][name]
  ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
  if not ok or v < low or (strict and v == low):
    fail(f"{section}.{name}", v, f"a finite number {'>' if strict else '>='} {low}")


def field_choice(cfg, section, name, choices):
  v = cfg[section][name]
  if v not in choices:
    fail(f"{section}.{name}", v, " | ".join(map(str, choices)))


def field_bool(cfg, section, name):
  v = cfg[section][name]
  if not isinstance(v, bool):
    fail(f"{section}.{name}", v, "True | False")


def check_task(validate_task, task) -> None:
  """Runs a task module's `validate` and raises its ValueError ("task.d=0 is invalid; …") as
  the config's ConfigError ("config.task.d=0 is invalid; …")."""
  try:
    validate_task(task)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None


def load_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (what --config=<path> loads)."""
  spec = importlib.util.spec_from_file_location(
      "loopicl_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def known_fields(cfg) -> dict:
  """Section -> allowed field names for the family of `cfg` (a field in no schema is a typo)."""
  family = family_lib.get(cfg.task.kind)
  known = {k: set(v) for k, v in GENERIC_FIELDS.items()}
  known["task"] = set(family.task_config().keys())
  known["model"] |= set(family.model_fields)
  return known


def _check_known_fields(cfg) -> None:
  known = known_fields(cfg)
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
  _check_subsections("task", cfg.task, family_lib.get(cfg.task.kind).task_config())


def _check_subsections(prefix, section, schema) -> None:
  """A field whose schema default is itself a section (task.ood) is checked key by key."""
  for key in section.keys():
    if key in schema and isinstance(schema[key], ml_collections.ConfigDict):
      sub, names = section[key], set(schema[key].keys())
      if not isinstance(sub, ml_collections.ConfigDict):
        raise ConfigError(f"config.{prefix}.{key}={sub!r} is invalid; allowed: a section of fields")
      for name in sub.keys():
        if name not in names:
          raise ConfigError(f"config.{prefix}.{key}.{name} is an unknown field; allowed: "
                            f"{' | '.join(sorted(names))}")
      _check_subsections(f"{prefix}.{key}", sub, schema[key])


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) with one line naming the first bad field."""
  for section in ("task", "model", "train", "eval", "checkpoint"):
    if section not in cfg:
      raise ConfigError(f"config.{section} is missing; a config needs task, model, train, eval, checkpoint")
  if "kind" not in cfg.task:
    raise ConfigError("config.task.kind is missing; allowed: " + " | ".join(family_lib.kinds()))
  family = family_lib.get(cfg.task.kind)
  _check_known_fields(cfg)
  field_int(cfg, "model", "loops")
  family.validate(cfg)
  if "cpu_devices" in cfg:
    v = cfg.cpu_devices
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
      fail("cpu_devices", v, "an integer >= 0 (0: JAX's default device count)")
  if "distributed" in cfg and not isinstance(cfg.distributed, bool):
    fail("distributed", cfg.distributed, "True | False")
  _validate_train(cfg)
  field_int(cfg, "eval", "every")
  field_int(cfg, "eval", "num_prompts")
  field_int(cfg, "eval", "seed", 0)
  if "extrapolation" in cfg.eval:  # optional: configs written before it existed lack it
    field_int(cfg, "eval", "extrapolation")
  field_int(cfg, "checkpoint", "every")
  field_int(cfg, "checkpoint", "keep")


def _validate_train(cfg) -> None:
  field_int(cfg, "train", "seed", 0)
  field_int(cfg, "train", "steps")
  field_int(cfg, "train", "batch_size")
  field_choice(cfg, "train", "optimizer", OPTIMIZERS)
  field_real(cfg, "train", "learning_rate", 0.0, strict=True)
  field_choice(cfg, "train", "schedule", SCHEDULES)
  field_int(cfg, "train", "warmup_steps", 0)
  field_real(cfg, "train", "grad_clip", 0.0)
  field_real(cfg, "train", "weight_decay", 0.0)
  field_real(cfg, "train", "momentum", 0.0)
  if cfg.train.momentum >= 1:
    fail("train.momentum", cfg.train.momentum, "a number in [0, 1)")
  field_int(cfg, "train", "loss_loops")
  if cfg.train.loss_loops > cfg.model.loops:
    fail("train.loss_loops", cfg.train.loss_loops, f"an integer in [1, model.loops={cfg.model.loops}]")
  field_choice(cfg, "train", "loss_normalization", LOSS_NORMALIZATIONS)
  if "construction_steps" in cfg.train:  # optional: configs written before it existed lack it
    field_int(cfg, "train", "construction_steps", -1)  # -1: the whole run
  if "tail_pool" in cfg.train:  # optional, like construction_steps
    field_int(cfg, "train", "tail_pool", 1)
  if "tail_prompts" in cfg.train:
    field_int(cfg, "train", "tail_prompts", 0)
    if cfg.train.tail_prompts >= cfg.train.batch_size:
      fail("train.tail_prompts", cfg.train.tail_prompts,
           f"an integer in [0, train.batch_size={cfg.train.batch_size})")
  if "shampoo_decay" in cfg.train:  # soap only; optional, like construction_steps
    field_real(cfg, "train", "shampoo_decay", 0.0)
    if cfg.train.shampoo_decay >= 1:
      fail("train.shampoo_decay", cfg.train.shampoo_decay, "a number in [0, 1)")
  if "precondition_every" in cfg.train:
    field_int(cfg, "train", "precondition_every")
  if "adam_eps" in cfg.train:  # optional, like construction_steps
    field_real(cfg, "train", "adam_eps", 0.0, strict=True)
  if "adam_b2" in cfg.train:
    field_real(cfg, "train", "adam_b2", 0.0)
    if cfg.train.adam_b2 >= 1:
      fail("train.adam_b2", cfg.train.adam_b2, "a number in [0, 1)")
  if "nonfinite_skips" in cfg.train:  # optional, like construction_steps
    field_int(cfg, "train", "nonfinite_skips", 0)
  field_int(cfg, "train", "steps_per_call")
  field_int(cfg, "train", "curriculum_start", 0)
  if cfg.train.curriculum_start > cfg.model.loops:
    fail("train.curriculum_start", cfg.train.curriculum_start,
         f"0 (off) or an integer in [1, model.loops={cfg.model.loops}]")
  field_int(cfg, "train", "curriculum_every")
  field_int(cfg, "train", "curriculum_increment")
  field_int(cfg, "train", "log_every")


def get_dotted(cfg, dotted):
  """cfg["a"]["b"] for "a.b"; None where a part is missing."""
  node = cfg
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def shape_fields(cfg) -> tuple[str, ...]:
  """The dotted fields whose change makes a checkpoint of `cfg` unrestorable."""
  return SHAPE_FIELDS + tuple(family_lib.get(cfg.task.kind).shape_fields)


def shape_field_differences(stored: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """The shape fields whose values differ between a stored config (dict) and `cfg`."""
  stored = ml_collections.ConfigDict(stored)
  return [f for f in shape_fields(cfg) if get_dotted(stored, f) != get_dotted(cfg, f)]


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
