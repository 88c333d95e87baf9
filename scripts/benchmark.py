"""Throughput of the training step, FLOPs, fraction of the matmul peak (loopicl/benchmark.py).

  python scripts/benchmark.py --config configs/default.py
  python scripts/benchmark.py --config configs/default.py --config.task.d=20 \\
      --config.model.loops=10 --config.train.batch_size=256 --config.train.steps_per_call=10 \\
      --config.model.unroll=10 --config.cpu_devices=2          # the paper-like config, 2 cores
  python scripts/benchmark.py --config configs/default.py --n_scaling --remat_memory \\
      --fake_devices=1,2,4 --json

With --json the last line of the output is one JSON object with every number (steps_per_s,
examples_per_s, flops_per_step, achieved_flops_per_s, naive_steps_per_s,
matmul_peak_flops_per_s, peak_fraction, …).  Numbers taken on a shared machine are noisy: each is
the best of --repeats chunks, printed beside the load average.
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
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


from loopicl.cli import fail as _fail  # noqa: E402  (one home for the one-line errors)


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


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; allowed: --config, --config.<field>=<value>, flags")
  FLAGS = flags.FLAGS
  if FLAGS.config is None:
    _fail("--config is required; allowed: a config file such as configs/default.py")
  logging.set_verbosity(logging.WARNING)
  from loopicl import benchmark, config as config_lib, distributed
  config = FLAGS.config
  try:
    config_lib.validate(config)
    distributed.maybe_initialize(config)  # before any JAX computation: cpu_devices, multi-host
    ns = [int(n) for n in FLAGS.scaling_ns]
    counts = [int(k) for k in FLAGS.fake_devices]
  except (config_lib.ConfigError, ValueError) as e:
    _fail(str(e))
  say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if FLAGS.json else print
  try:
    result = benchmark.throughput(config, repeats=FLAGS.repeats, naive=FLAGS.naive,
                                  peak=FLAGS.peak, xla_flops=FLAGS.xla_flops,
                                  compare_xla=FLAGS.compare_xla)
    base_flags = _config_flags(sys.argv[1:])
    if FLAGS.n_scaling:
      say("n scaling …")
      result["n_scaling"] = benchmark.n_scaling(config, ns, batch=FLAGS.scaling_batch,
                                                textbook_max_bytes=FLAGS.textbook_max_gb * 1e9,
                                                log=say)
    if FLAGS.remat_memory:
      say("remat memory …")
      result["remat_memory"] = benchmark.remat_memory(config, base_flags, log=say)
    if counts:
      say("host devices …")
      result["fake_devices"] = benchmark.fake_devices(base_flags, counts,
                                                      repeats=FLAGS.repeats, log=say)
  except (config_lib.ConfigError, ValueError, RuntimeError) as e:
    _fail(" ".join(str(e).split()), 1)
  print(benchmark.format_report(result))
  if FLAGS.json:
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
