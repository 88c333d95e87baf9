"""Command-line entry points (scripts/*.py and the console scripts call these).

Errors a user can fix (a bad config field, an incompatible workdir, a non-finite loss) are
printed as one line on stderr with exit status 2 (config) or 1 (run) — never a traceback.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _train_flags():
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.", required=True)
  flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)


def fail(message: str, status: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _train_main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; allowed: --config, --workdir, --config.<field>=<value>", 2)
  from loopicl import errors, run, train
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
  FLAGS = flags.FLAGS
  if FLAGS.config is None:
    fail("--config is required; allowed: a config file such as configs/default.py", 2)
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  except errors.ConfigError as e:
    fail(str(e), 2)
  except errors.RunError as e:
    fail(str(e), 1)
  print(run.summary(result, FLAGS.config))


def _flags_parser(allowed: str):
  """absl's parser, with flag errors (unknown or ill-typed flags or --config.* fields) as one line."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, or AttributeError/KeyError/TypeError from config_flags
      message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
      fail(f"bad command-line flag ({message}); allowed: {allowed}", 2)
  return parse


def run_train():
  """Entry point of scripts/train.py (console script loopicl-train)."""
  _train_flags()
  app.run(_train_main, flags_parser=_flags_parser(
      "--config=<file> --workdir=<dir> --config.<section>.<field>=<value> (fields of the config file)"))


def _evaluate_main(argv):
  from loopicl import errors, run
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; allowed: --workdir, --loops_max, --num_prompts", 2)
  if not FLAGS.workdir:
    fail("--workdir is required; allowed: a run directory written by scripts/train.py", 2)
  logging.set_verbosity(logging.WARNING)
  try:
    run.evaluate_run(FLAGS.workdir, FLAGS.loops_max, FLAGS.num_prompts)
  except (errors.RunError, ValueError) as e:
    fail(" ".join(str(e).split()), 2)


def run_evaluate():
  """Entry point of scripts/evaluate.py (console script loopicl-evaluate)."""
  flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).")
  flags.DEFINE_integer("loops_max", None, "Evaluate loops 1..loops_max (default: max(2·T, 40)).")
  flags.DEFINE_integer("num_prompts", 4096, "Held-out prompts the errors are reported on.")
  app.run(_evaluate_main, flags_parser=_flags_parser(
      "--workdir=<run dir> --loops_max=<int >= T> --num_prompts=<int >= 1>"))
