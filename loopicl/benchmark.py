"""How fast the training step runs, and how close that is to what the machine can do.

The unit is the whole optimizer step as `train.py` runs it — sampling the batch on device, the
looped forward pass, the gradient, clipping and Adam — timed through `train.make_train_chunk`
(`train.steps_per_call` steps per jitted call, state donated, the batch split over the devices
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

The modes beyond the headline table: `n_scaling` (time per step against n for both forms),
`remat_memory` (XLA's buffer sizes and the process's peak RSS with and without `model.remat`) and
`fake_devices` (the same step on 1, 2, 4 host devices, one subprocess each, since the device
count is fixed when JAX starts).  scripts/benchmark.py is the command line; docs/scaling.md has
the numbers.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import distributed, family as family_lib, train
from loopicl.linear import model as model_lib, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  form = form or config.model.get("form", "reassociated")
  per_loop = loop_flops(int(t.d), int(t.d_out), int(t.n_context), tasks.num_queries(t), form)
  return 3 * int(config.model.loops) * int(config.train.batch_size) * per_loop


# -- building the real step -----------------------------------------------------------------------

def _with_form(config, form: str | None, kernel: str | None = None):
  """A copy of `config` whose model uses `form` (and `kernel`, if given)."""
  config = config.copy_and_resolve_references()
  config.model.form = form or config.model.get("form", "reassociated")
  if kernel is not None:
    config.model.kernel = kernel
  return config


def resolved_kernel(config, form: str | None = None) -> str:
  """The kernel the model of `config` (with `form`) runs: "xla" or "cpu" (model.resolve_kernel)."""
  return model_lib.resolve_kernel(config.model.get("kernel", "xla"),
                                  form or config.model.get("form", "reassociated"))


def _check_task(config) -> None:
  if config.task.kind not in tasks.TASK_KINDS:
    raise ValueError(f"task.kind={config.task.kind!r} is invalid for the benchmark; allowed: "
                     f"{' | '.join(tasks.TASK_KINDS)}")


def _family_state(config):
  """(family, tx, model_def, state) of `config`, exactly as train_and_evaluate builds them."""
  _check_task(config)
  family = family_lib.of(config)
  tx = train.family_optimizer(family)
  model_def, state = train.init_state(family, tx, config.train.seed)
  return family, tx, model_def, state


def build(config, form: str | None = None, kernel: str | None = None):
  """(chunk, state, family, model_def, tx) for `config`, exactly as train_and_evaluate runs it."""
  config = _with_form(config, form, kernel)
  family, tx, model_def, state = _family_state(config)
  state = distributed.place_state(state)
  chunk = train.make_train_chunk(family, model_def, tx, int(config.train.batch_size),
                                 int(config.model.loops))
  return chunk, state, family, model_def, tx


def xla_step_flops(config, form: str | None = None) -> float:
  """XLA's cost-analysis FLOPs of one unsharded step, loops unrolled (so each one is counted)."""
  config = _with_form(config, form, kernel="xla")  # XLA cannot count inside a foreign call
  config.model.unroll = int(config.model.loops)
  family, tx, model_def, state = _family_state(config)
  step = train.make_train_step(family, model_def, tx, int(config.train.batch_size),
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
          "unroll": int(m.unroll), "remat": bool(m.remat), "form": m.get("form", "reassociated"),
          "kernel": m.get("kernel", "xla")}


def throughput(config, *, repeats: int = 5, naive: bool = True, peak: bool = True,
               xla_flops: bool = True, compare_xla: bool = True) -> dict:
  """The headline numbers: steps/s, FLOP/s and the fraction of the matmul peak, both forms.

  With `compare_xla` and the fused CPU kernel in use, the same step on the plain XLA path too.
  """
  batch = int(config.train.batch_size)
  form = config.model.get("form", "reassociated")
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


# -- modes ----------------------------------------------------------------------------------------

def _with(config, **fields):
  """A copy of `config` with dotted fields replaced: _with(c, **{"task.n_context": 80})."""
  c = config.copy_and_resolve_references()
  for dotted, value in fields.items():
    section, name = dotted.split(".")
    c[section][name] = value
  return c


def textbook_bytes(config) -> int:
  """Activation bytes the textbook form keeps for the backward pass: T · batch · n · (n + m) · 4."""
  t = config.task
  cols = int(t.n_context) + tasks.num_queries(t)
  per_loop = int(config.train.batch_size) * int(t.n_context) * cols * 4
  return per_loop * (1 if config.model.remat else int(config.model.loops))


def n_scaling(config, ns, *, batch: int, repeats: int = 2, steps_per_call: int = 2,
              textbook_max_bytes: float = 2e9, log=print) -> list[dict]:
  """Seconds per step against n for both forms, at the config's d, T and this batch.

  A textbook point whose attention matrices would exceed `textbook_max_bytes` is skipped (its
  estimate is reported): at n = 5000 they are 5000² floats per prompt and loop.
  """
  rows = []
  for n in ns:
    c = _with(config, **{"task.n_context": int(n), "train.batch_size": int(batch),
                         "train.steps_per_call": int(steps_per_call)})
    row = {"n": int(n), "batch": int(batch)}
    for form in ("reassociated", "textbook"):
      if form == "textbook" and textbook_bytes(c) > textbook_max_bytes:
        row["textbook_skipped_bytes"] = textbook_bytes(c)
        continue
      r = time_steps(c, repeats=repeats, form=form, peak=False,
                     kernel="xla" if form == "textbook" else None)
      row[f"{form}_seconds_per_step"] = r["seconds_per_step"]
      row[f"{form}_flops_per_step"] = step_flops(c, form)
    rows.append(row)
    log(f"  n={n}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
  return rows


def _child(overrides: list[str], extra_env: dict | None = None, timeout: float = 1800) -> dict:
  """Runs scripts/benchmark.py --json in a fresh process; returns its last line, parsed."""
  env = dict(os.environ, **(extra_env or {}))
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *overrides, "--json"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  lines = out.stdout.strip().splitlines()
  if out.returncode != 0 or not lines:
    tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"benchmark child {' '.join(overrides)} failed (rc={out.returncode}): {tail}")
  return json.loads(lines[-1])


def remat_memory(config, base_flags: list[str], *, loops: int = 100, d: int = 20, n: int = 80,
                 repeats: int = 2, log=print) -> list[dict]:
  """Memory and speed of the step at T = loops with and without model.remat.

  XLA's `memory_analysis()` of the compiled chunk gives the buffer sizes exactly (temp = the
  activations kept for the backward pass); a fresh subprocess per setting gives the process's
  peak RSS, runtime included.
  """
  rows = []
  for remat in (False, True):
    fields = {"model.loops": loops, "task.d": d, "task.n_context": n, "model.remat": remat}
    c = _with(config, **fields)
    chunk, state, *_ = build(c)
    compiled = chunk.jitted.lower(state, jnp.int32(0), int(c.train.steps_per_call)).compile()
    mem = compiled.memory_analysis()
    row = {"remat": remat, "loops": loops, "d": d, "n": n, "batch": int(c.train.batch_size),
           "temp_bytes": int(mem.temp_size_in_bytes),
           "argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes)}
    del chunk, state, compiled
    flags = [f for f in base_flags if not any(f.startswith(f"--config.{k}=") for k in fields)]
    flags += [f"--config.{k}={v}" for k, v in fields.items()]
    child = _child(flags + ["--naive=false", "--peak=false", "--xla_flops=false",
                            f"--repeats={repeats}"])
    row["max_rss_bytes"] = child["max_rss_bytes"]
    row["steps_per_s"] = child["steps_per_s"]
    rows.append(row)
    log(f"  remat={remat}: temp {row['temp_bytes'] / 2**20:.1f} MiB, "
        f"peak RSS {row['max_rss_bytes'] / 2**20:.0f} MiB, {row['steps_per_s']:.2f} steps/s")
  return rows


def fake_devices(base_flags: list[str], counts, *, repeats: int = 5, log=print) -> list[dict]:
  """The same step on k host devices (XLA_FLAGS=--xla_force_host_platform_device_count=k)."""
  rows = []
  for k in counts:
    xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
    env = {"XLA_FLAGS": f"{xla} --xla_force_host_platform_device_count={int(k)}".strip(),
           "JAX_PLATFORMS": "cpu"}
    flags = [f for f in base_flags if not f.startswith("--config.cpu_devices=")]
    child = _child(flags + ["--config.cpu_devices=0", "--naive=false", "--xla_flops=false",
                            f"--repeats={repeats}"], env)
    row = {k2: child.get(k2) for k2 in ("devices", "kernel", "steps_per_s", "steps_per_s_median",
                                        "examples_per_s", "achieved_flops_per_s",
                                        "matmul_peak_flops_per_s", "peak_fraction",
                                        "cpu_seconds_per_step", "cpu_peak_fraction",
                                        "load_avg_before")}
    rows.append(row)
    log(f"  {k} device(s), kernel {row['kernel']}: {row['steps_per_s']:.1f} steps/s, peak fraction "
        f"{row['peak_fraction']:.3f}")
  return rows


# -- the report -----------------------------------------------------------------------------------

def _g(x, scale=1.0, fmt="{:.3g}"):
  return "—" if x is None else fmt.format(x / scale)


def format_report(r: dict) -> str:
  c = r["config"]
  lines = [
      f"loopicl benchmark: {c['task']} d={c['d']} d_out={c['d_out']} n={c['n']} m={c['m']} "
      f"T={c['loops']} batch={c['batch']} {c['optimizer']}, unroll={c['unroll']} "
      f"remat={c['remat']}, {c['steps_per_call']} steps/call, kernel={c.get('kernel', 'xla')}",
      f"{r['devices']} {r['platform']} device(s), {r['cpu_count']} cores, jax {r['jax']}; load "
      f"average {r['load_avg_before'][0]:.2f} before, {r['load_avg_after'][0]:.2f} after",
      "",
      f"{'form/kernel':<20}{'steps/s':>10}{'(median)':>10}{'examples/s':>12}{'GFLOP/step':>12}"
      f"{'GFLOP/s':>10}{'of peak':>9}",
  ]
  peak = r.get("matmul_peak_flops_per_s")
  main_label = f"{r['form']}/{r.get('kernel', 'xla')}"
  lines.append(f"{main_label:<20}{r['steps_per_s']:>10.2f}{r['steps_per_s_median']:>10.2f}"
               f"{r['examples_per_s']:>12.0f}{r['flops_per_step'] / 1e9:>12.4f}"
               f"{r['achieved_flops_per_s'] / 1e9:>10.2f}"
               f"{_g(r.get('peak_fraction'), fmt='{:.1%}'):>9}")
  if "xla_kernel_steps_per_s" in r:
    lines.append(f"{r['form'] + '/xla':<20}{r['xla_kernel_steps_per_s']:>10.2f}{'':>10}"
                 f"{r['config']['batch'] * r['xla_kernel_steps_per_s']:>12.0f}"
                 f"{r['flops_per_step'] / 1e9:>12.4f}"
                 f"{r['xla_kernel_achieved_flops_per_s'] / 1e9:>10.2f}"
                 f"{_g(r.get('xla_kernel_peak_fraction'), fmt='{:.1%}'):>9}")
  if "naive_steps_per_s" in r:
    lines.append(f"{r['naive_form'] + '/xla':<20}{r['naive_steps_per_s']:>10.2f}{'':>10}"
                 f"{r['naive_examples_per_s']:>12.0f}{r['naive_flops_per_step'] / 1e9:>12.4f}"
                 f"{r['naive_achieved_flops_per_s'] / 1e9:>10.2f}"
                 f"{_g(r.get('naive_peak_fraction'), fmt='{:.1%}'):>9}")
  if peak:
    lines.append(f"{'matmul 2048²':<20}{'':>10}{'':>10}{'':>12}{2 * PEAK_SIZE ** 3 / 1e9:>12.4f}"
                 f"{peak / 1e9:>10.2f}{'100%':>9}")
  if "cpu_peak_fraction" in r:
    lines.append(f"(per CPU-second, whatever the load: the step does "
                 f"{r['cpu_peak_fraction']:.1%} of the matmul's FLOPs; "
                 f"{r['cpu_seconds_per_step'] * 1e3:.1f} CPU-ms per step)")
  if "xla_flops_per_step" in r:
    lines.append(f"(XLA's count of one step, sampling and optimizer included: "
                 f"{r['xla_flops_per_step'] / 1e9:.4f} GFLOP)")
  if r.get("n_scaling"):
    lines += ["", f"n scaling (d={c['d']}, T={c['loops']}, batch {r['n_scaling'][0]['batch']}): "
              "ms per step", f"{'n':>6}{'reassociated':>14}{'per n (µs)':>12}{'textbook':>12}"
              f"{'ratio':>8}"]
    for row in r["n_scaling"]:
      fast = row.get("reassociated_seconds_per_step")
      slow = row.get("textbook_seconds_per_step")
      slow_text = (_g(slow, 1e-3, "{:.1f}") if slow is not None else
                   f"skip {row.get('textbook_skipped_bytes', 0) / 1e9:.0f}GB")
      lines.append(f"{row['n']:>6}{_g(fast, 1e-3, '{:.2f}'):>14}"
                   f"{_g(fast / row['n'] if fast else None, 1e-6, '{:.2f}'):>12}{slow_text:>12}"
                   f"{_g(slow / fast if slow and fast else None, fmt='{:.1f}'):>8}")
  if r.get("remat_memory"):
    m0 = r["remat_memory"][0]
    lines += ["", f"remat (T={m0['loops']}, d={m0['d']}, n={m0['n']}, batch {m0['batch']})",
              f"{'remat':<8}{'XLA temp MiB':>14}{'peak RSS MiB':>14}{'steps/s':>10}"]
    for row in r["remat_memory"]:
      lines.append(f"{str(row['remat']):<8}{row['temp_bytes'] / 2**20:>14.1f}"
                   f"{row['max_rss_bytes'] / 2**20:>14.0f}{row['steps_per_s']:>10.2f}")
  if r.get("fake_devices"):
    lines += ["", "host devices (XLA_FLAGS=--xla_force_host_platform_device_count=k)",
              f"{'k':>3}{'kernel':>7}{'steps/s':>10}{'(median)':>10}{'GFLOP/s':>10}{'of peak':>9}"
              f"{'CPU-ms/step':>13}{'per CPU-s':>11}{'load':>7}"]
    for row in r["fake_devices"]:
      lines.append(f"{row['devices']:>3}{str(row.get('kernel')):>7}{row['steps_per_s']:>10.2f}"
                   f"{row['steps_per_s_median']:>10.2f}"
                   f"{row['achieved_flops_per_s'] / 1e9:>10.2f}"
                   f"{_g(row.get('peak_fraction'), fmt='{:.1%}'):>9}"
                   f"{row['cpu_seconds_per_step'] * 1e3:>13.1f}"
                   f"{_g(row.get('cpu_peak_fraction'), fmt='{:.1%}'):>11}"
                   f"{row['load_avg_before'][0]:>7.1f}")
  return "\n".join(lines)
