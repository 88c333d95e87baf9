"""One-line checks of config fields, shared by the generic schema (config.py) and the families:
`field_int(cfg, "model", "loops")` raises ConfigError("config.model.loops=0 is invalid; allowed:
an integer >= 1")."""
from __future__ import annotations

import numbers

from loopicl.errors import ConfigError


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
