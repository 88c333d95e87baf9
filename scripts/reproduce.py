"""Run the reproduction grid and write results.csv, summary.md and the figures into --workdir.

  python scripts/reproduce.py --config configs/reproduce.py --workdir runs/reproduce
  python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick

Rerunning the same command resumes: finished grid points (<workdir>/points/*.json) are skipped.
A bad config or flag is reported as one line on stderr with exit status 2.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

flags.DEFINE_string("workdir", None, "Directory for points/, results.csv, summary.md, figures.")
config_flags.DEFINE_config_file("config", None, "Reproduce config (configs/reproduce*.py).",
                                lock_config=True)


from loopicl.cli import fail as _fail  # noqa: E402  (one home for the one-line errors)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; allowed: --config, --workdir, --config.<field>=<value>")
  FLAGS = flags.FLAGS
  if FLAGS.config is None:
    _fail("--config is required; allowed: configs/reproduce.py | configs/reproduce_quick.py")
  if not FLAGS.workdir:
    _fail("--workdir is required; allowed: a directory path (created if missing)")
  logging.set_verbosity(logging.WARNING)
  from loopicl import config as config_lib, reproduce
  try:
    config = FLAGS.config
    config.keys()  # config_flags loads the file lazily: a missing or broken file fails here
  except Exception as e:
    _fail("cannot load --config: " + " ".join(str(e).split()))
  try:
    reproduce.validate(config)
  except (reproduce.GridError, config_lib.ConfigError) as e:
    _fail(str(e))
  except (AttributeError, KeyError, TypeError) as e:  # not a reproduce config (missing fields)
    _fail(f"--config is not a reproduce config ({e}); allowed: configs/reproduce.py | configs/reproduce_quick.py")
  reproduce.run(config, FLAGS.workdir, log=lambda s: print(s, flush=True))


def _parse_flags(argv):
  """absl's parser, with flag errors (missing file, unknown or ill-typed field) as one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or errors from the config file / config_flags
    _fail("bad command-line flag or config file: " + " ".join(str(e).split()))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
