"""The errors a user can fix. Each message is one line naming the field and what is allowed.

This module imports nothing of loopicl, so every module can raise these without import cycles.
The command-line entry points (cli.py) print them as `error: <message>` — never a traceback.
"""


class ConfigError(ValueError):
  """A config field holds a value it may not hold (exit status 2)."""


class RunError(RuntimeError):
  """A run cannot go on: non-finite loss, incompatible or missing workdir (exit status 1 or 2)."""
