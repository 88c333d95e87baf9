"""A family of runs: the product of swept config fields × seeds, each seed an ordinary run directory.

  python scripts/sweep.py --config configs/default.py --sweep model.loops=5,10,20 \\
      --sweep train.learning_rate=1e-3,3e-3 --seeds 4 --workdir runs/sweep1

Every point of the product (loops × learning rates above) trains its seeds in one vmapped program
(`sweep.make_sweep_chunk`: one compile, K seeds per dispatch), and every seed writes an ordinary
run directory, `<workdir>/<point>/seed<s>/`, exactly what `scripts/train.py` with train.seed = s
writes — config.json, checkpoints, metrics.jsonl, TensorBoard — so `scripts/evaluate.py` and
TensorBoard read it like any run (`tensorboard --logdir <workdir>` compares them all, HParams
tab included).  A seed whose loss turns non-finite freezes at its last good state and is reported;
the others go on.  A killed sweep resumes: rerun the same command — finished points are read
back, a half-trained point continues from its seeds' newest common checkpoint.
`<workdir>/sweep.csv` (one row per point × seed: the swept values, the final metrics) and
`summary.md` (mean and median over seeds per point) and `sweep.png` (+ .pdf) are rebuilt at the end.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import itertools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import checkpointing, config as config_lib, family as family_lib, jsonfile
from loopicl import run as run_lib
from loopicl import runlog, stats, sweep, train
from loopicl.errors import ConfigError


def parse_sweeps(specs, config) -> list[tuple[str, list]]:
  """["model.loops=5,10,20", …] -> [("model.loops", [5, 10, 20]), …], values typed like the
  field's value in `config`.  ConfigError (one line) names a bad --sweep."""
  out, seen = [], set()
  for spec in specs:
    field, sep, values = spec.partition("=")
    allowed = "<section>.<field>=<value>,<value>,… naming a field of the config"
    if not sep or not values or field.count(".") < 1:
      raise ConfigError(f"--sweep={spec!r} is invalid; allowed: {allowed}")
    if config_lib.get_dotted(config, field) is None and not _has(config, field):
      raise ConfigError(f"--sweep={spec!r} is invalid: config.{field} does not exist; allowed: {allowed}")
    if field in seen:
      raise ConfigError(f"--sweep={spec!r} is invalid: {field} is swept twice; allowed: one --sweep per field")
    seen.add(field)
    current = config_lib.get_dotted(config, field)
    out.append((field, [_typed(field, v.strip(), current) for v in values.split(",")]))
  return out


def _has(config, dotted) -> bool:
  *parents, name = dotted.split(".")
  node = config
  for part in parents:
    if part not in node:
      return False
    node = node[part]
  return name in node


def _typed(field: str, text: str, current):
  """`text` as the type of the field's current value (bool, int, float or str)."""
  if isinstance(current, bool):
    if text.lower() in ("true", "false"):
      return text.lower() == "true"
  elif isinstance(current, int):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      pass
  elif isinstance(current, str) or current is None:
    return text
  raise ConfigError(f"--sweep {field}={text!r} is invalid; allowed: a {type(current).__name__} "
                    f"(the type of config.{field})")


def points(sweeps) -> list[dict]:
  """The product of the swept values, in command-line order: [{field: value, …}, …]."""
  fields = [f for f, _ in sweeps]
  return [dict(zip(fields, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def point_name(point: dict) -> str:
  """A directory name for a point: "model.loops=5,train.learning_rate=0.001" made path-safe."""
  text = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def point_config(config, point: dict):
  """`config` with the point's values set (validated)."""
  c = config.copy_and_resolve_references()
  for field, value in point.items():
    *parents, name = field.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[name] = value
  config_lib.validate(c)
  return c


# -- one point: K seeds in one program, K run directories ----------------------------------------

def _restore(ckpts, states, log):
  """(step, states): the seeds' newest common good checkpoint (a sweep killed between two seeds'
  saves left one seed a checkpoint ahead: it is restored at the common step, and keeps its newer
  checkpoint on disk), or (0, states) if any seed has none."""
  seeds = range(len(ckpts))
  one = [jax.tree.map(lambda x, k=k: x[k], states) for k in seeds]
  found = [ckpt.restore_latest(state, log=log) for ckpt, state in zip(ckpts, one)]
  if any(step is None for step, _ in found):
    return 0, states
  step = min(int(s) for s, _ in found)
  restored = [st if int(s) == step else ckpt.restore(step, target)
              for (s, st), ckpt, target in zip(found, ckpts, one)]
  return step, jax.tree.map(lambda *leaves: jnp.stack(leaves), *restored)


@contextlib.contextmanager
def _closing(resource):
  try:
    yield resource
  finally:
    resource.close()


def run_point(config, point_dir: str, seeds, *, log=print) -> list[dict]:
  """Trains (or resumes) `config` for every seed, vmapped; each seed writes the run directory
  `<point_dir>/seed<s>` as train_and_evaluate would.  Returns one record per seed: seed, step,
  diverged_at, metrics (the last evaluation's scalars)."""
  family = family_lib.of(config)
  tx = train.family_optimizer(family)
  configs = []
  for s in seeds:
    c = config.copy_and_resolve_references()
    c.train.seed = int(s)
    configs.append(c)
  dirs = [os.path.join(point_dir, f"seed{s}") for s in seeds]
  with contextlib.ExitStack() as stack:
    for d in dirs:
      stack.enter_context(run_lib.WorkdirLock(d))
    for c, d in zip(configs, dirs):
      run_lib.prepare_workdir(c, d, log)
    model_def, states = sweep.init_states(family, tx, seeds)
    ckpts = [stack.enter_context(_closing(checkpointing.Checkpointer(
        os.path.join(d, "checkpoints"), int(config.checkpoint.keep)))) for d in dirs]
    step, states = _restore(ckpts, states, log)
    rlogs = [stack.enter_context(_closing(runlog.RunLog(d))) for d in dirs]
    for c, rl in zip(configs, rlogs):
      rl.truncate_after(step)
      if step == 0:
        rl.start_run(c, family)
    return _train_point(config, family, tx, model_def, states, step, ckpts, rlogs, seeds, log)


def _train_point(config, family, tx, model_def, states, step, ckpts, rlogs, seeds, log):
  K, total = len(seeds), int(config.train.steps)
  mesh = sweep.seed_mesh(K)
  states, bad = sweep.place_seeds((states, jnp.full((K,), -1, jnp.int32)), mesh)
  evaluate = family.make_evaluator()
  chunks, last, recent = {}, [{} for _ in seeds], [{} for _ in seeds]
  diverged = np.full(K, -1)
  t_last, steps_since = time.time(), 0
  while step < total:
    loops = train.loops_at(config, step)
    end = train.next_boundary(config, step, total)
    if loops not in chunks:
      chunks[loops] = sweep.make_sweep_chunk(family, model_def, tx, int(config.train.batch_size),
                                             loops, mesh)
    states, bad, metrics = chunks[loops](states, bad, jnp.int32(step), end - step)
    metrics = {k: np.asarray(v) for k, v in metrics.items()}                 # [K, length]
    newly = (np.asarray(bad) >= 0) & (diverged < 0)
    for k in np.flatnonzero(newly):
      diverged[k] = int(np.asarray(bad)[k])
      log(f"  seed {seeds[k]}: non-finite loss or gradient at step {diverged[k]}; frozen at its "
          "last good state (the other seeds go on)")
    steps_since += end - step
    step = end
    steps_per_s = steps_since / max(time.time() - t_last, 1e-9)
    params = None
    for k in np.flatnonzero(diverged < 0):
      mine = {name: v[k] for name, v in metrics.items()}
      recent[k] = {n: v[-int(config.train.steps_per_call):] for n, v in mine.items() if n != "grad_norm"}
      if step % config.train.log_every == 0 or step == total:
        rlogs[k].train_chunk(step, mine, learning_rate=float(train.learning_rate_schedule(config.train)(step)),
                             steps_per_s=steps_per_s, loops=loops)
      if step % config.eval.every == 0 or step == total:
        params = jax.device_get(states["params"]) if params is None else params
        model = model_def.merge(jax.tree.map(lambda x: x[k], params))
        last[k] = rlogs[k].evaluation(step, evaluate(model), recent[k])
        family.log_extras(rlogs[k], step, model, last[k])
        rlogs[k].flush()
      # A seed resumed behind its own newest checkpoint recomputes that step bit for bit (same
      # program, same state): the checkpoint already on disk is that state, kept as it is.
      if (step % config.checkpoint.every == 0 or step == total) and step not in ckpts[k].all_steps():
        ckpts[k].save(step, jax.tree.map(lambda x: x[k], states))
    if step % config.train.log_every == 0:
      t_last, steps_since = time.time(), 0
  if not any(last):  # a finished point launched again: evaluate, write nothing
    params = jax.device_get(states["params"])
    last = [evaluate(model_def.merge(jax.tree.map(lambda x: x[k], params))) for k in range(K)]
  return [{"seed": int(s), "step": int(last[k].get("step", step)), "diverged_at": int(diverged[k]),
           "metrics": _scalar_metrics(last[k])} for k, s in enumerate(seeds)]


def run(config, sweeps, seeds, workdir: str, *, log=print) -> list[dict]:
  """Runs (or resumes) every point of the sweep in `workdir`; writes sweep.csv, summary.md and the
  figure after each point.  Returns the sweep.csv records."""
  seeds = [int(s) for s in seeds]
  todo = points(sweeps)
  configs = [point_config(config, p) for p in todo]  # every point valid before any work
  os.makedirs(workdir, exist_ok=True)
  jsonfile.write(os.path.join(workdir, "sweep.json"),
                 {"sweeps": [[f, v] for f, v in sweeps], "seeds": seeds,
                  "config": config.to_dict()}, indent=1, sort_keys=True)
  rows = []
  for i, (p, c) in enumerate(zip(todo, configs), start=1):
    name = point_name(p)
    log(f"[{i}/{len(todo)}] {name} ({len(seeds)} seeds)")
    t0 = time.time()
    for record in run_point(c, os.path.join(workdir, name), seeds, log=log):
      rows.append(dict(record, point=p))
    log(f"[{i}/{len(todo)}] {name} done in {time.time() - t0:.0f} s")
    write_outputs(workdir, sweeps, rows)
  return rows


# -- outputs --------------------------------------------------------------------------------------

def _scalar_metrics(result: dict) -> dict:
  return {k: v for k, v in result.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def write_outputs(workdir: str, sweeps, rows: list[dict]) -> None:
  """sweep.csv (one row per point × seed), summary.md and sweep.png/.pdf."""
  fields = [f for f, _ in sweeps]
  metrics = sorted({k for r in rows for k in r["metrics"]})
  columns = fields + ["seed", "step", "diverged_at"] + metrics
  path = os.path.join(workdir, "sweep.csv")
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({**r["point"], "seed": r["seed"], "step": r["step"],
                       "diverged_at": r["diverged_at"],
                       **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r["metrics"].items()}})
  os.replace(path + ".tmp", path)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(summary_markdown(sweeps, rows))
  if rows:
    runlog.save_figure(figure(sweeps, rows), workdir, "sweep")


def _headline(rows) -> list[str]:
  """The metrics worth a summary column: the family's test error or 0-1 loss and its ratios."""
  keys = {k for r in rows for k in r["metrics"]}
  preferred = ("test_error", "gd_ratio", "pgd_ratio", "weight_distance", "test_zero_one",
               "test_cross_entropy", "train_loss")
  return [k for k in preferred if k in keys] or sorted(keys)[:4]


def _by_point(rows):
  groups = {}
  for r in rows:
    groups.setdefault(point_name(r["point"]), []).append(r)
  return groups


def summary_markdown(sweeps, rows: list[dict]) -> str:
  """One table row per point: mean and median over its seeds of the headline metrics."""
  fields, heads = [f for f, _ in sweeps], _headline(rows)
  lines = ["# Sweep: " + ", ".join(f"{f} ∈ {{{', '.join(map(str, v))}}}" for f, v in sweeps), "",
           "Mean [median] over the seeds that did not diverge; `diverged` counts the others.", "",
           "| " + " | ".join(fields + heads + ["diverged"]) + " |",
           "|---" * (len(fields) + len(heads) + 1) + "|"]
  for group in _by_point(rows).values():
    alive = [r for r in group if r["diverged_at"] < 0]
    cells = []
    for key in heads:
      values = np.array([r["metrics"].get(key, np.nan) for r in alive], np.float64)
      mean, _ = stats.finite_mean(values)
      median = np.median(values) if values.size else np.nan
      cells.append(f"{mean:.4g} [{median:.4g}]" if values.size else "—")
    lines.append("| " + " | ".join([str(group[0]["point"][f]) for f in fields] + cells
                                   + [f"{len(group) - len(alive)}/{len(group)}"]) + " |")
  return "\n".join(lines) + "\n"


def figure(sweeps, rows):
  """The first headline metric against the first swept field, one line per combination of the
  others (median over seeds, min–max band), log y."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.5, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  key = _headline(rows)[0]
  x_field = sweeps[0][0]
  lines = {}
  for r in rows:
    if r["diverged_at"] < 0:
      rest = tuple((f, v) for f, v in r["point"].items() if f != x_field)
      lines.setdefault(rest, {}).setdefault(r["point"][x_field], []).append(r["metrics"].get(key, np.nan))
  for i, (rest, by_x) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
    xs = list(by_x)
    values = [np.asarray(by_x[x], np.float64) for x in xs]
    label = ", ".join(f"{f}={v}" for f, v in rest) or key
    ax.plot(range(len(xs)), [np.median(v) for v in values], marker="o", color=f"C{i}", label=label,
            gid=f"{key}:{label}")
    ax.fill_between(range(len(xs)), [v.min() for v in values], [v.max() for v in values],
                    color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
  if any(np.nanmin(np.asarray(r["metrics"].get(key, np.nan), float)) > 0 for r in rows):
    ax.set_yscale("log")
  ax.set_xlabel(x_field)
  ax.set_ylabel(f"{key} (median over seeds, band: min–max)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig
