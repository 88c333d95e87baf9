"""Experiment configs: the schema with every default, and validation that fails before any work.

An experiment config is a `ConfigDict` with sections `task`, `model`, `train`, `eval`,
`checkpoint`, the family's own section (the linear family's `linear`) and the top-level
`distributed`, `cpu_devices`.  `defaults(kind)` builds the complete config of a task kind: the
generic sections below and the family's `task`, `model` and own section (family.py).  Every field
has its default there and nowhere else — configs/*.py build on `defaults`, and no code reads a
field with a fallback.  `validate` refuses a config with a missing or unknown field, or a bad
value, in one line naming the field; `schema_differences` tells a run directory written by
another release (a field added or removed since) so it is refused, never trained on another
recipe; `shape_field_differences` refuses to resume a run whose parameter shapes would change.

The `field_*` checkers (fields.py, re-exported here) are shared with the families:
`field_int(cfg, "model", "loops")` raises ConfigError("config.model.loops=0 is invalid; allowed:
an integer >= 1").
"""
from __future__ import annotations

import importlib.util
import numbers
import os

import ml_collections

from loopicl import registry
from loopicl.errors import ConfigError
from loopicl.fields import (check_task, fail, field_bool, field_choice, field_int,  # noqa: F401
                            field_real)

OPTIMIZERS = ("adam", "adamw", "sgd", "soap")
SCHEDULES = ("constant", "cosine")
# Fields that fix the shape of the optimizer state, whatever the family.
SHAPE_FIELDS = ("task.kind", "train.optimizer")


def train_defaults() -> ml_collections.ConfigDict:
  """The `train` section: optimisation, the loop curriculum and the non-finite policy."""
  t = ml_collections.ConfigDict()
  t.seed = 0                  # parameter init and training-data seed (step s: fold_in(key, s))
  t.steps = 2000              # optimizer steps (the linear family links it to T and κ_Σ)
  t.batch_size = 128          # prompts per step
  t.optimizer = "soap"        # adam | adamw | sgd | soap (Adam in Shampoo's eigenbasis, soap.py)
  t.learning_rate = 1e-2      # peak learning rate
  t.schedule = "cosine"       # constant | cosine (decay to 0 after the warm-up)
  t.warmup_steps = 300        # linear warm-up from 0
  t.grad_clip = 100.0         # global-norm clipping (0: off): a guard against one extreme batch
  t.weight_decay = 0.0        # adamw only
  t.momentum = 0.9            # sgd only
  t.adam_b2 = 0.99            # adam / adamw / soap: decay of the second moment
  t.adam_eps = 1e-8           # adam / adamw / soap: ε of the denominator √v + ε
  t.shampoo_decay = 0.99      # soap only: EMA decay of the factors GGᵀ, GᵀG
  t.precondition_every = 10   # soap only: recompute their eigenbases every this many steps
  t.curriculum_start = 1      # loop curriculum: start at this many loops (0: off) …
  t.curriculum_every = 100    # … and add curriculum_increment loops every this many steps
  t.curriculum_increment = 1
  t.nonfinite_skips = 5       # skip up to this many non-finite steps in a row (state unchanged,
                              # next batch); the next one stops the seed at its last good state
  t.steps_per_call = 50       # optimizer steps per jitted call (lax.scan): amortises dispatch
  t.log_every = 100           # train scalars to TensorBoard every this many steps
  return t


def eval_defaults() -> ml_collections.ConfigDict:
  """The `eval` section: the evaluation during training on a fixed held-out set."""
  e = ml_collections.ConfigDict()
  e.every = 500               # evaluate every this many steps (and at the end)
  e.num_prompts = 2048        # held-out prompts
  e.seed = 1234               # seed of the held-out prompts (independent of train.seed)
  return e


def checkpoint_defaults() -> ml_collections.ConfigDict:
  """The `checkpoint` section: Orbax checkpoints in <workdir>/checkpoints."""
  c = ml_collections.ConfigDict()
  c.every = 1000              # save every this many steps (and at the end)
  c.keep = 3                  # keep the newest this many
  return c


def defaults(kind: str) -> ml_collections.ConfigDict:
  """The complete config of task kind `kind`, every field at its default (the schema)."""
  family = registry.get(kind)
  c = ml_collections.ConfigDict()
  c.task = family.task_config()
  c.task.kind = kind
  c.model = ml_collections.ConfigDict()
  c.model.loops = 5           # T: loops of the shared block at the end of training
  c.model.update(family.model_config())
  c.train = train_defaults()
  if family.section is not None:
    c[family.section] = family.section_config()
  c.eval = eval_defaults()
  c.checkpoint = checkpoint_defaults()
  c.distributed = False       # call jax.distributed.initialize() (multi-host; docs/scaling.md)
  c.cpu_devices = 0           # split the host CPU into this many devices (0: JAX's default, one)
  family.link(c)              # the family's defaults that follow other fields (FieldReferences)
  return c


def load_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (what --config=<path> loads)."""
  spec = importlib.util.spec_from_file_location(
      "loopicl_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fields(tree: dict, prefix: str = "") -> set[str]:
  """Every dotted leaf field of a (nested) dict."""
  out = set()
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _fields(value, f"{prefix}{key}.")
    else:
      out.add(prefix + key)
  return out


def _check_fields(cfg, schema) -> None:
  """Every field of the schema present, none other (a missing one would silently change the
  recipe, an unknown one is a typo)."""
  for key in cfg.keys():
    if key not in schema:
      raise ConfigError(f"config.{key} is an unknown field; allowed: {' | '.join(sorted(schema.keys()))}")
  _check_section("", cfg, schema)


def _check_section(prefix, section, schema) -> None:
  for key in section.keys():
    if key not in schema:
      raise ConfigError(f"config.{prefix}{key} is an unknown field; allowed: "
                        f"{' | '.join(sorted(schema.keys()))}")
  for key in schema.keys():
    if key not in section:
      raise ConfigError(f"config.{prefix}{key} is missing; a config builds on "
                        "loopicl.config.defaults(kind), which has every field (configs/default.py)")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(section[key], ml_collections.ConfigDict):
        raise ConfigError(f"config.{prefix}{key}={section[key]!r} is invalid; allowed: a section of fields")
      _check_section(f"{prefix}{key}.", section[key], schema[key])


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) with one line naming the first bad field."""
  if "task" not in cfg or not isinstance(cfg.task, ml_collections.ConfigDict) or "kind" not in cfg.task:
    raise ConfigError("config.task.kind is missing; allowed: " + " | ".join(registry.kinds()))
  family = registry.get(cfg.task.kind)
  _check_fields(cfg, defaults(cfg.task.kind))
  field_int(cfg, "model", "loops")
  v = cfg.cpu_devices
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
    fail("cpu_devices", v, "an integer >= 0 (0: JAX's default device count)")
  if not isinstance(cfg.distributed, bool):
    fail("distributed", cfg.distributed, "True | False")
  _validate_train(cfg)
  family.validate(cfg)  # after train: the family's checks may compare with train fields
  field_int(cfg, "eval", "every")
  field_int(cfg, "eval", "num_prompts")
  field_int(cfg, "eval", "seed", 0)
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
  for name in ("momentum", "shampoo_decay", "adam_b2"):
    field_real(cfg, "train", name, 0.0)
    if cfg.train[name] >= 1:
      fail(f"train.{name}", cfg.train[name], "a number in [0, 1)")
  field_int(cfg, "train", "precondition_every")
  field_real(cfg, "train", "adam_eps", 0.0, strict=True)
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
  return SHAPE_FIELDS + tuple(registry.get(cfg.task.kind).shape_fields)


def shape_field_differences(stored: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """The shape fields whose values differ between a stored config (dict) and `cfg`."""
  stored = ml_collections.ConfigDict(stored)
  return [f for f in shape_fields(cfg) if get_dotted(stored, f) != get_dotted(cfg, f)]


def schema_differences(stored: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """The fields a stored config (dict, a run directory's config.json) lacks or has beyond the
  schema of `cfg`'s kind: non-empty for a run written by another release of loopicl."""
  schema = _fields(defaults(cfg.task.kind).to_dict())
  found = _fields(stored)
  return ([f"has {f}" for f in sorted(found - schema)] +
          [f"lacks {f}" for f in sorted(schema - found)])


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
