"""Which family serves each `task.kind`: the built-in families by name, others registered.

The built-ins are named here as "module:Class" and imported on first lookup, so importing
loopicl does not import every family's dependencies, and a family module never imports this one
(no import circle: family.py holds the base class, this module the lookup).

  registry.of(config)                 # the family of config.task.kind, bound to the config
  registry.register(MyFamily)         # a new family (tests/test_family.py's toy)
"""
from __future__ import annotations

import importlib

from loopicl.errors import ConfigError

BUILTIN = {
    "linear_regression": "loopicl.linear.family:LinearFamily",
    "vector_generation": "loopicl.linear.family:LinearFamily",
    "concept_classification": "loopicl.concepts.family:ConceptFamily",
}

_REGISTRY: dict[str, type] = {}


def _load_builtins() -> None:
  for kind, where in BUILTIN.items():
    if kind not in _REGISTRY:
      module, name = where.split(":")
      _REGISTRY[kind] = getattr(importlib.import_module(module), name)


def register(family: type) -> type:
  """Adds `family` for each of its kinds (usable as a class decorator); a kind registered twice
  by different classes is an error, re-registering the same class is not."""
  if not family.kinds:
    raise ValueError(f"{family.__name__}.kinds is empty; allowed: a tuple of task.kind names")
  _load_builtins()
  for kind in family.kinds:
    other = _REGISTRY.get(kind)
    if other is not None and other.__qualname__ != family.__qualname__:
      raise ValueError(f"task.kind={kind!r} is already registered by {other.__name__}")
    _REGISTRY[kind] = family
  return family


def unregister(family: type) -> None:
  for kind in family.kinds:
    if _REGISTRY.get(kind) is family:
      del _REGISTRY[kind]


def kinds() -> tuple[str, ...]:
  """Every registered task.kind, built-ins first."""
  _load_builtins()
  return tuple(_REGISTRY)


def families() -> list[type]:
  _load_builtins()
  return list(dict.fromkeys(_REGISTRY.values()))


def get(kind) -> type:
  """The family class of `kind`; ConfigError naming task.kind and the registered kinds."""
  _load_builtins()
  family = _REGISTRY.get(kind) if isinstance(kind, str) else None
  if family is None:
    raise ConfigError(f"config.task.kind={kind!r} is invalid; allowed: {' | '.join(_REGISTRY)}")
  return family


def of(config, training: bool = False):
  """The family of `config`, bound to it (`training`: ready to build training steps)."""
  return get(config.task.kind)(config, training=training)
