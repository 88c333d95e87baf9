"""The benchmark's other modes and its printed report.

  * `n_scaling`: time per step against n for both attention forms (the textbook form is O(n²·D));
  * `remat_memory`: XLA's buffer sizes and the process's peak RSS with and without `model.remat`;
  * `fake_devices`: the same step on 1, 2, 4 host devices, one subprocess each, since the device
    count is fixed when JAX starts;
  * `format_report`: the table scripts/benchmark.py prints (benchmark.throughput's numbers).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp

from loopicl.experiments.benchmark import PEAK_SIZE, build, step_flops, time_steps
from loopicl.linear import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    compiled = chunk.lower(state, jnp.int32(0), int(c.train.steps_per_call)).compile()
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
