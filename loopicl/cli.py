"""Command-line entry points: every script in scripts/ (and each console script) calls one of these.

Shared plumbing: absl flags with `--config` as an ml_collections config file, flag errors and
errors a user can fix (a bad config field, an incompatible workdir, a non-finite loss) printed
as one line on stderr with exit status 2 (config, flags) or 1 (run) — never a traceback.
Heavy imports (JAX, Orbax) happen inside the mains, after the flags are parsed.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

TRAIN_USAGE = "--config=<file> --workdir=<dir> --config.<section>.<field>=<value> (fields of the config file)"


def fail(message: str, status: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def one_line(e: BaseException) -> str:
  return " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())


def _flags_parser(allowed: str):
  """absl's parser, with flag errors (unknown or ill-typed flags or --config.* fields) as one line."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, or AttributeError/KeyError/TypeError from config_flags
      fail(f"bad command-line flag ({one_line(e)}); allowed: {allowed}", 2)
  return parse


def _config_flag(help_text: str) -> None:
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def _loaded_config(allowed: str):
  """FLAGS.config, loaded (config_flags loads lazily: a missing or broken file fails here)."""
  config = flags.FLAGS.config
  if config is None:
    fail(f"--config is required; allowed: {allowed}", 2)
  try:
    config.keys()
  except Exception as e:
    fail("cannot load --config: " + one_line(e), 2)
  return config


def _experiment_config():
  """--config loaded, validated and its devices prepared (cpu_devices, multi-host) before any
  JAX computation; a bad field is one line."""
  from loopicl import config as config_lib, distributed, errors
  config = _loaded_config("a config file such as configs/default.py")
  try:
    config_lib.validate(config)
    distributed.maybe_initialize(config)
  except errors.ConfigError as e:
    fail(str(e))
  return config


def _no_arguments(argv, allowed: str) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; allowed: {allowed}", 2)


def _run(main, allowed: str) -> None:
  app.run(main, flags_parser=_flags_parser(allowed))


# -- scripts/train.py -----------------------------------------------------------------------------

def _train_main(argv):
  _no_arguments(argv, "--config, --workdir, --config.<field>=<value>")
  from loopicl import errors, run, train
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
  config = _loaded_config("a config file such as configs/default.py")
  try:
    result = train.train_and_evaluate(config, flags.FLAGS.workdir, progress=flags.FLAGS.progress)
  except errors.ConfigError as e:
    fail(str(e), 2)
  except errors.RunError as e:
    fail(str(e), 1)
  print(run.summary(result, config))


def run_train():
  """Entry point of scripts/train.py (console script loopicl-train)."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.", required=True)
  flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
  _config_flag("Experiment config file (configs/*.py).")
  _run(_train_main, TRAIN_USAGE)


# -- scripts/evaluate.py --------------------------------------------------------------------------

def _evaluate_main(argv):
  _no_arguments(argv, "--workdir, --loops_max, --num_prompts")
  from loopicl import errors, run
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    fail("--workdir is required; allowed: a run directory written by scripts/train.py", 2)
  logging.set_verbosity(logging.WARNING)
  try:
    run.evaluate_run(FLAGS.workdir, FLAGS.loops_max, FLAGS.num_prompts)
  except (errors.RunError, ValueError) as e:
    fail(one_line(e), 2)


def run_evaluate():
  """Entry point of scripts/evaluate.py (console script loopicl-evaluate)."""
  flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).")
  flags.DEFINE_integer("loops_max", None, "Evaluate loops 1..loops_max (default: max(2·T, 40)).")
  flags.DEFINE_integer("num_prompts", 4096, "Held-out prompts the errors are reported on.")
  _run(_evaluate_main, "--workdir=<run dir> --loops_max=<int >= T> --num_prompts=<int >= 1>")


# -- scripts/benchmark.py -------------------------------------------------------------------------

def _config_flags(args: list[str]) -> list[str]:
  """--config and its --config.* overrides from the command line, as --flag=value (for children)."""
  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
      if i + 1 < len(args):
        out.append(f"{arg}={args[i + 1]}")
      i += 2
      continue
    if arg.startswith("--config=") or arg.startswith("--config."):
      out.append(arg)
    i += 1
  return out


def _benchmark_main(argv):
  _no_arguments(argv, "--config, --config.<field>=<value>, flags")
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  config = _experiment_config()
  from loopicl import errors
  from loopicl.experiments import benchmark, benchmark_modes
  try:
    ns = [int(n) for n in FLAGS.scaling_ns]
    counts = [int(k) for k in FLAGS.fake_devices]
  except ValueError as e:
    fail(str(e))
  say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if FLAGS.json else print
  try:
    result = benchmark.throughput(config, repeats=FLAGS.repeats, naive=FLAGS.naive,
                                  peak=FLAGS.peak, xla_flops=FLAGS.xla_flops,
                                  compare_xla=FLAGS.compare_xla)
    base_flags = _config_flags(sys.argv[1:])
    if FLAGS.n_scaling:
      say("n scaling …")
      result["n_scaling"] = benchmark_modes.n_scaling(
          config, ns, batch=FLAGS.scaling_batch, textbook_max_bytes=FLAGS.textbook_max_gb * 1e9,
          log=say)
    if FLAGS.remat_memory:
      say("remat memory …")
      result["remat_memory"] = benchmark_modes.remat_memory(config, base_flags, log=say)
    if counts:
      say("host devices …")
      result["fake_devices"] = benchmark_modes.fake_devices(base_flags, counts,
                                                            repeats=FLAGS.repeats, log=say)
  except (errors.ConfigError, ValueError, RuntimeError) as e:
    fail(one_line(e), 1)
  print(benchmark_modes.format_report(result))
  if FLAGS.json:
    print(json.dumps(result, sort_keys=True))


def run_benchmark():
  """Entry point of scripts/benchmark.py (console script loopicl-benchmark)."""
  _config_flag("Experiment config file (configs/*.py).")
  flags.DEFINE_bool("json", False, "Print every number as one JSON object on the last line.")
  flags.DEFINE_integer("repeats", 5, "Timed chunks (of train.steps_per_call steps) per measurement.")
  flags.DEFINE_bool("naive", True, "Also time the other attention form (textbook, O(n²·D)).")
  flags.DEFINE_bool("compare_xla", True, "With the fused CPU kernel in use, also time the plain XLA step.")
  flags.DEFINE_bool("peak", True, "Time a 2048² float32 matmul for the peak fraction.")
  flags.DEFINE_bool("xla_flops", True, "Also report XLA's cost-analysis FLOPs of one step.")
  flags.DEFINE_bool("n_scaling", False, "Time per step against n, both forms.")
  flags.DEFINE_list("scaling_ns", ["40", "100", "250", "500", "1000", "2500", "5000"],
                    "The n of the scaling curve.")
  flags.DEFINE_integer("scaling_batch", 8, "Batch of the scaling curve (the textbook form is O(n²)).")
  flags.DEFINE_float("textbook_max_gb", 2.0, "Skip textbook points whose attention needs more.")
  flags.DEFINE_bool("remat_memory", False, "Memory with and without model.remat at T=100, d=20, n=80.")
  flags.DEFINE_list("fake_devices", [], "Host device counts to compare, e.g. 1,2,4 (a subprocess each).")
  _run(_benchmark_main, "--config=<file> --config.<field>=<value> --json --repeats=<int> … "
                        "(scripts/benchmark.py --help)")


# -- scripts/benchmark_sweep.py -------------------------------------------------------------------

def _benchmark_sweep_main(argv):
  _no_arguments(argv, "--config, --seeds, --steps, --loops, --cpu_devices")
  FLAGS = flags.FLAGS
  from loopicl import config as config_lib, distributed, errors
  try:
    distributed.set_cpu_devices(FLAGS.cpu_devices)  # before any JAX computation
    config = _loaded_config("a config file such as configs/default.py")
    config.train.steps = FLAGS.steps
    if FLAGS.loops:
      config.model.loops = FLAGS.loops
    config_lib.validate(config)
  except errors.ConfigError as e:
    fail(str(e))
  from loopicl.experiments import sweep_benchmark
  sweep_benchmark.compare(config, list(range(FLAGS.seeds)), log=lambda s: print(s, flush=True))


def run_benchmark_sweep():
  """Entry point of scripts/benchmark_sweep.py."""
  import os
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         "default.py")
  config_flags.DEFINE_config_file("config", default, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_integer("seeds", 8, "K, the number of seeds.", lower_bound=1)
  flags.DEFINE_integer("steps", 300, "Training steps of every seed.", lower_bound=1)
  flags.DEFINE_integer("loops", None, "model.loops (default: the config's).", lower_bound=1)
  flags.DEFINE_integer("cpu_devices", 0, "Host CPU devices (0: one).", lower_bound=0)
  _run(_benchmark_sweep_main, "--config=<file> --seeds=<int> --steps=<int> --loops=<int> "
                              "--cpu_devices=<int>")


# -- scripts/reproduce.py -------------------------------------------------------------------------

REPRODUCE_CONFIGS = "configs/reproduce.py | configs/reproduce_quick.py | configs/reproduce_warm.py"


def _reproduce_config():
  """--config loaded and validated as a reproduce config (one-line errors)."""
  from loopicl import errors
  from loopicl.experiments import reproduce
  config = _loaded_config(REPRODUCE_CONFIGS)
  try:
    reproduce.validate(config)
  except (reproduce.GridError, errors.ConfigError) as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError) as e:  # not a reproduce config (missing fields)
    fail(f"--config is not a reproduce config ({one_line(e)}); allowed: {REPRODUCE_CONFIGS}")
  return config


def _reproduce_main(argv):
  _no_arguments(argv, "--config, --workdir, --config.<field>=<value>")
  if not flags.FLAGS.workdir:
    fail("--workdir is required; allowed: a directory path (created if missing)")
  logging.set_verbosity(logging.WARNING)
  config = _reproduce_config()
  from loopicl.experiments import reproduce
  reproduce.run(config, flags.FLAGS.workdir, log=lambda s: print(s, flush=True))


def run_reproduce():
  """Entry point of scripts/reproduce.py (console script loopicl-reproduce)."""
  flags.DEFINE_string("workdir", None, "Directory for points/, results.csv, summary.md, figures.")
  _config_flag(f"Reproduce config ({REPRODUCE_CONFIGS}).")
  _run(_reproduce_main, "--config=<file> --workdir=<dir> --config.<section>.<field>=<value>")


# -- scripts/learning.py --------------------------------------------------------------------------

def _learning_config():
  from loopicl import errors
  from loopicl.experiments import learning
  if not flags.FLAGS.workdir:
    fail("--workdir is required; allowed: a directory path (created if missing)")
  config = _loaded_config("configs/learning.py")
  try:
    learning.validate(config)
  except errors.ConfigError as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError) as e:  # not a learning config (missing fields)
    fail(f"--config is not a learning config ({one_line(e)}); allowed: configs/learning.py")
  return config


def _learning_main(argv):
  _no_arguments(argv, "--config, --workdir, --config.<field>=<value>")
  logging.set_verbosity(logging.WARNING)
  from loopicl.experiments import learning
  config = _learning_config()
  learning.run(config, flags.FLAGS.workdir, log=lambda s: print(s, flush=True))


def run_learning():
  """Entry point of scripts/learning.py."""
  flags.DEFINE_string("workdir", None, "Directory for points/, learning.csv, summary.md, figure.")
  _config_flag("Learning config (configs/learning.py).")
  _run(_learning_main, "--config=<file> --workdir=<dir> --config.<section>.<field>=<value>")


# -- scripts/learning_tails.py --------------------------------------------------------------------

def _learning_tails_main(argv):
  _no_arguments(argv, "--config, --workdir, --tails, --population")
  logging.set_verbosity(logging.WARNING)
  from loopicl.experiments import learning_tails
  config = _learning_config()
  if not (flags.FLAGS.tails or flags.FLAGS.population):
    fail("--tails or --population=N is required; allowed: either or both")
  lines = (learning_tails.tail_report(config, flags.FLAGS.workdir) if flags.FLAGS.tails else []) + (
      learning_tails.population_report(config, flags.FLAGS.workdir, flags.FLAGS.population)
      if flags.FLAGS.population else [])
  for line in lines:
    print(line, flush=True)


def run_learning_tails():
  """Entry point of scripts/learning_tails.py: reports on a finished learning workdir."""
  flags.DEFINE_string("workdir", None, "A learning workdir (scripts/learning.py) with finished settings.")
  flags.DEFINE_bool("tails", False, "Print which prompts decide each finished seed's mean.")
  flags.DEFINE_integer("population", 0, "Read each finished seed, GD and PGD on this many fresh "
                       "prompts (0: off): population mean / median ratios.", lower_bound=0)
  _config_flag("Learning config (configs/learning.py) the workdir was trained with.")
  _run(_learning_tails_main, "--config=<file> --workdir=<dir> [--tails] [--population=N]")


# -- scripts/sweep.py -----------------------------------------------------------------------------

def _sweep_main(argv):
  _no_arguments(argv, "--config, --sweep, --seeds, --first_seed, --workdir, --config.<field>=<value>")
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  config = _experiment_config()
  from loopicl import errors
  from loopicl.experiments import sweep_runs
  try:
    sweeps = sweep_runs.parse_sweeps(FLAGS.sweep, config)
    for point in sweep_runs.points(sweeps):  # every point valid before any work
      sweep_runs.point_config(config, point)
  except errors.ConfigError as e:
    fail(str(e))
  try:
    seeds = range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds)
    rows = sweep_runs.run(config, sweeps, seeds, FLAGS.workdir,
                          log=lambda s: print(s, flush=True))
  except errors.ConfigError as e:
    fail(str(e), 2)
  except errors.RunError as e:
    fail(str(e), 1)
  print(f"wrote {FLAGS.workdir}/sweep.csv ({len(rows)} rows), summary.md, sweep.png")


def run_sweep():
  """Entry point of scripts/sweep.py (console script loopicl-sweep)."""
  _config_flag("Experiment config file (configs/*.py): the base of every point.")
  flags.DEFINE_multi_string("sweep", [], "<section>.<field>=v1,v2,… (repeat for a product).")
  flags.DEFINE_integer("seeds", 1, "K seeds per point (first_seed … first_seed+K−1), trained in "
                       "one vmapped program.", lower_bound=1)
  flags.DEFINE_integer("first_seed", 0, "The first seed (seeds kept apart from a study's, e.g. to "
                       "choose a recipe on seeds it does not report).", lower_bound=0)
  flags.DEFINE_string("workdir", None, "Directory of the sweep: one run directory per point and "
                      "seed, sweep.csv, summary.md.", required=True)
  _run(_sweep_main, "--config=<file> --sweep=<section>.<field>=v1,v2 … --seeds=<int> "
                    "--workdir=<dir>")
