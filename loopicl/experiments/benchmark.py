"""How fast the training step runs, and how close that is to what the machine can do.

The unit is the whole optimizer step as `train.py` runs it — sampling the batch on device, the
looped forward pass, the gradient, clipping and the optimizer — timed through the training
loop's own program (`step.make_chunk`, `train.steps_per_call` steps per jitted call, state donated, the batch split over the devices
when there are several), so a number here is a number of the real training loop.  Rows are
named form/kernel: the config's kernel as `model.resolve_kernel` resolves it ("cpu": the fused
C++ loop of loopicl/kernels; "xla": plain JAX), and, when that is "cpu", the plain XLA step
timed beside it; the textbook form always runs on XLA.

FLOPs.  `step_flops` counts the model's matrix products analytically.  Per loop and prompt, with
D = d + d_out rows, n context and m query columns (c = n + m):

  reassociated  Z M Zᵀ: 2nD²,  P·G and ·Q: 2·2D³,  W·Z: 2D²c             — O(n·D²)
  textbook      Zᵀ_ctx Q: 2nD², ·Z: 2nDc,  P·Z_ctx: 2D²n,  ·attention: 2Dnc — O(n²·D)

and the backward pass costs twice the forward (each product's gradient is two products of its
size), so a step is 3·T·batch·(per-loop count).  Sampling, the loss and the optimizer add < 1%
and are left out, as in the usual "model FLOPs" accounting; XLA's own count of one step (loops
unrolled: XLA counts a while-loop body once) is reported beside it as a check.

Peak.  The reference is a 2048 × 2048 float32 matmul timed in the same process, interleaved with
the step timings so both see the same machine load; `peak_fraction` = achieved / peak.  On a
shared machine every time is the best of `repeats` (the least disturbed run); the median is
reported too, and so is `cpu_peak_fraction`, the same ratio per CPU-second of this process
(step FLOPs per CPU-second over the matmul's), which other jobs on the machine barely move: it
is what peak_fraction becomes on a quiet machine if every core works for the step.

The modes beyond the headline table are in benchmark_modes.py, with the printed report;
scripts/benchmark.py is the command line (cli.run_benchmark); docs/scaling.md has the numbers.
"""
from __future__ import annotations

import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from loopicl import registry, optim, step as step_lib
from loopicl.linear import model as model_lib, tasks

PEAK_SIZE = 2048
CONTRACT_KEYS = ("steps_per_s", "examples_per_s", "flops_per_step", "achieved_flops_per_s",
                 "naive_steps_per_s", "matmul_peak_flops_per_s", "peak_fraction")


# -- FLOP accounting ------------------------------------------------------------------------------

def loop_flops(d: int, d_out: int, n: int, m: int, form: str) -> int:
  """Forward FLOPs of one loop on one prompt (matrix products only; see the module docstring)."""
  D, c = d + d_out, n + m
  if form == "reassociated":
    return 2 * n * D * D + 4 * D ** 3 + 2 * D * D * c
  if form == "textbook":
    return 2 * n * D * D + 2 * n * D * c + 2 * D * D * n + 2 * D * n * c
  raise ValueError(f"form={form!r} is invalid; allowed: reassociated | textbook")


def step_flops(config, form: str | None = None) -> int:
  """FLOPs of one training step: 3 (forward + backward) · T · batch · loop_flops."""
  t = config.task
  form = form or config.model.form
  per_loop = loop_flops(int(t.d), int(t.d_out), int(t.n_context), tasks.num_queries(t), form)
  return 3 * int(config.model.loops) * int(config.train.batch_size) * per_loop


# -- building the real step -----------------------------------------------------------------------

def _with_form(config, form: str | None, kernel: str | None = None):
  """A copy of `config` whose model uses `form` (and `kernel`, if given)."""
  config = config.copy_and_resolve_references()
  config.model.form = form or config.model.form
  if kernel is not None:
    config.model.kernel = kernel
  return config


def resolved_kernel(config, form: str | None = None) -> str:
  """The kernel the model of `config` (with `form`) runs: "xla" or "cpu" (model.resolve_kernel)."""
  return model_lib.resolve_kernel(config.model.kernel, form or config.model.form)


def _check_task(config) -> None:
  if config.task.kind not in tasks.TASK_KINDS:
    raise ValueError(f"task.kind={config.task.kind!r} is invalid for the benchmark; allowed: "
                     f"{' | '.join(tasks.TASK_KINDS)}")


def _family_state(config):
  """(family, tx, model_def, state) of `config`, exactly as the training loop builds them."""
  _check_task(config)
  family = registry.of(config, training=True)
  tx = optim.make_optimizer(config.train)
  model_def, state = step_lib.init_state(family, tx, config.train.seed)
  return family, tx, model_def, state


def build(config, form: str | None = None, kernel: str | None = None):
  """(chunk, states, family, model_def, tx) for `config`, exactly as train_and_evaluate runs it:
  the training loop's program (step.make_chunk) for one seed, placed as the loop places it.
  `chunk(states, first_step, length) -> (states, first_bad_step, metrics)`; `chunk.lower(states,
  first_step, length)` lowers it (cost and memory analysis)."""
  config = _with_form(config, form, kernel)
  family, tx, model_def, state = _family_state(config)
  placement = step_lib.Placement.of(1, int(config.train.batch_size))
  states, bad = placement.place((step_lib.stack([state]), jnp.full((1,), -1, jnp.int32)))
  jitted = step_lib.make_chunk(family, model_def, tx, int(config.train.batch_size),
                               int(config.model.loops), placement)

  def chunk(states, first_step, length):
    states, first_bad, metrics = jitted(states, bad, first_step, length)
    return states, first_bad[0], metrics

  chunk.lower = lambda states, first_step, length: jitted.lower(states, bad, first_step, length)
  return chunk, states, family, model_def, tx


def xla_step_flops(config, form: str | None = None) -> float:
  """XLA's cost-analysis FLOPs of one unsharded step, loops unrolled (so each one is counted)."""
  config = _with_form(config, form, kernel="xla")  # XLA cannot count inside a foreign call
  config.model.unroll = int(config.model.loops)
  family, tx, model_def, state = _family_state(config)
  step = step_lib.make_train_step(family, model_def, tx, int(config.train.batch_size),
                               int(config.model.loops))
  cost = jax.jit(step).lower(state, jnp.int32(0)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


# -- timing ---------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _matmul():
  a = jax.random.normal(jax.random.key(0), (PEAK_SIZE, PEAK_SIZE), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (PEAK_SIZE, PEAK_SIZE), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()  # compile

  def run() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one matmul."""
    c, t = _cpu_seconds(), time.perf_counter()
    f(a, b).block_until_ready()
    return time.perf_counter() - t, _cpu_seconds() - c

  return run


def time_steps(config, *, repeats: int, form: str | None = None, peak: bool = True,
               kernel: str | None = None) -> dict:
  """Times `repeats` chunks of train.steps_per_call steps (after one compiling call).

  With `peak`, a 2048² matmul is timed after every chunk (same load for both).  Besides wall
  time, the process's CPU-seconds are kept: on a machine shared with other jobs, FLOPs per
  CPU-second of the step against those of the matmul (`cpu_peak_fraction`) says how well each core
  is used whatever the load; on a quiet machine whose cores all work it approaches peak_fraction.
  """
  chunk, state, *_ = build(config, form, kernel)
  length = int(config.train.steps_per_call)
  t0 = time.perf_counter()
  state, bad, _ = chunk(state, jnp.int32(0), length)
  int(bad)
  compile_s = time.perf_counter() - t0
  matmul = _matmul() if peak else None
  step_s, step_cpu, matmul_s, matmul_cpu = [], [], [], []
  for r in range(repeats):
    c, t = _cpu_seconds(), time.perf_counter()
    state, bad, _ = chunk(state, jnp.int32((r + 1) * length), length)
    int(bad)  # the host loop reads this after every chunk too
    step_s.append((time.perf_counter() - t) / length)
    step_cpu.append((_cpu_seconds() - c) / length)
    if matmul is not None:
      wall, cpu = matmul()
      matmul_s.append(wall)
      matmul_cpu.append(cpu)
  out = {"seconds_per_step": min(step_s), "seconds_per_step_median": statistics.median(step_s),
         "cpu_seconds_per_step": min(step_cpu), "first_call_s": compile_s}
  if matmul_s:
    out["matmul_peak_flops_per_s"] = 2 * PEAK_SIZE ** 3 / min(matmul_s)
    out["matmul_flops_per_cpu_s"] = 2 * PEAK_SIZE ** 3 / max(min(matmul_cpu), 1e-9)
  return out


def _load() -> list[float]:
  try:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
  except OSError:
    return [float("nan")] * 3


def _max_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def describe(config) -> dict:
  t, m = config.task, config.model
  return {"task": t.kind, "d": int(t.d), "d_out": int(t.d_out), "n": int(t.n_context),
          "m": tasks.num_queries(t), "loops": int(m.loops), "batch": int(config.train.batch_size),
          "optimizer": config.train.optimizer, "steps_per_call": int(config.train.steps_per_call),
          "unroll": int(m.unroll), "remat": bool(m.remat), "form": m.form,
          "kernel": m.kernel}


def throughput(config, *, repeats: int = 5, naive: bool = True, peak: bool = True,
               xla_flops: bool = True, compare_xla: bool = True) -> dict:
  """The headline numbers: steps/s, FLOP/s and the fraction of the matmul peak, both forms.

  With `compare_xla` and the fused CPU kernel in use, the same step on the plain XLA path too.
  """
  batch = int(config.train.batch_size)
  form = config.model.form
  result = {"config": describe(config), "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "load_avg_before": _load()}
  main = time_steps(config, repeats=repeats, form=form, peak=peak)
  flops = step_flops(config, form)
  result.update({
      "form": form,
      "kernel": resolved_kernel(config, form),
      "steps_per_s": 1 / main["seconds_per_step"],
      "steps_per_s_median": 1 / main["seconds_per_step_median"],
      "examples_per_s": batch / main["seconds_per_step"],
      "flops_per_step": flops,
      "achieved_flops_per_s": flops / main["seconds_per_step"],
      "first_call_s": main["first_call_s"],
      "cpu_seconds_per_step": main["cpu_seconds_per_step"],
  })
  if peak:
    result["matmul_peak_flops_per_s"] = main["matmul_peak_flops_per_s"]
    result["peak_fraction"] = result["achieved_flops_per_s"] / result["matmul_peak_flops_per_s"]
    result["cpu_peak_fraction"] = (flops / max(main["cpu_seconds_per_step"], 1e-9)
                                   / main["matmul_flops_per_cpu_s"])
  if xla_flops:
    result["xla_flops_per_step"] = xla_step_flops(config, form)
  if compare_xla and result["kernel"] != "xla":
    plain = time_steps(config, repeats=max(1, repeats // 2), form=form, peak=False, kernel="xla")
    result["xla_kernel_steps_per_s"] = 1 / plain["seconds_per_step"]
    result["xla_kernel_achieved_flops_per_s"] = flops / plain["seconds_per_step"]
    if peak:
      result["xla_kernel_peak_fraction"] = (result["xla_kernel_achieved_flops_per_s"]
                                            / result["matmul_peak_flops_per_s"])
  if naive:
    other = "textbook" if form == "reassociated" else "reassociated"
    slow = time_steps(config, repeats=max(1, repeats // 2), form=other, peak=False,
                      kernel="xla" if other == "textbook" else None)
    naive_flops = step_flops(config, other)
    result.update({
        "naive_form": other,
        "naive_steps_per_s": 1 / slow["seconds_per_step"],
        "naive_examples_per_s": batch / slow["seconds_per_step"],
        "naive_flops_per_step": naive_flops,
        "naive_achieved_flops_per_s": naive_flops / slow["seconds_per_step"],
    })
    if peak:
      result["naive_peak_fraction"] = (result["naive_achieved_flops_per_s"]
                                       / result["matmul_peak_flops_per_s"])
  result["load_avg_after"] = _load()
  result["max_rss_bytes"] = _max_rss_bytes()
  return result
