"""A family of runs: the product of swept config fields × seeds, each seed an ordinary run directory.

  python scripts/sweep.py --config configs/default.py --sweep model.loops=5,10,20 \\
      --sweep train.learning_rate=1e-3,3e-3 --seeds 4 --workdir runs/sweep1

Every point of the product (loops × learning rates above) trains its seeds in one vmapped program
(the shared loop, loop.py: one compile, K seeds per dispatch), and every seed writes an ordinary
run directory, `<workdir>/<point>/seed<s>/`, exactly what `scripts/train.py` with train.seed = s
writes — config.json, checkpoints, metrics.jsonl, TensorBoard — so `scripts/evaluate.py` and
TensorBoard read it like any run (`tensorboard --logdir <workdir>` compares them all, HParams
tab included).  A seed whose loss turns non-finite freezes at its last good state and is reported;
the others go on.  A killed sweep resumes: rerun the same command — finished points are read
back (points/<point>.json, the study runner's: loopicl/study.py), a half-trained point continues
from its seeds' newest common checkpoint.
`<workdir>/sweep.csv` (one row per point × seed: the swept values, the final metrics) and
`summary.md` (mean and median over seeds per point) and `sweep.png` (+ .pdf) are rebuilt at the end.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import itertools
import json
import os
import re

import numpy as np

from loopicl import config as config_lib, jsonfile, loop, runlog, stats, study
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

def run_point(config, point_dir: str, seeds, *, log=print) -> list[dict]:
  """Trains (or resumes) `config` for every seed in the shared loop (loop.py), vmapped; each
  seed writes the run directory `<point_dir>/seed<s>` as train_and_evaluate would.  Returns one
  record per seed: seed, step, diverged_at, metrics (the last evaluation's scalars)."""
  seeds = [int(s) for s in seeds]
  dirs = [os.path.join(point_dir, f"seed{s}") for s in seeds]
  result = loop.train(config, seeds, dirs, log=log)
  return [{"seed": s, "step": int(result.evaluations[k].get("step", result.step)),
           "diverged_at": int(result.diverged_at[k]),
           "metrics": _scalar_metrics(result.evaluations[k])} for k, s in enumerate(seeds)]


class SweepStudy:
  """The sweep's points for the study runner (loopicl/study.py): each point's record is
  points/<point>.json; its seeds' run directories are <workdir>/<point>/seed<s>."""
  point_key = "point"

  def __init__(self, config, sweeps, seeds, workdir: str):
    self.config, self.sweeps, self.seeds = config, sweeps, [int(s) for s in seeds]
    self.workdir = workdir
    self._points = points(sweeps)
    self._configs = {point_name(p): point_config(config, p) for p in self._points}  # all valid first

  def points(self):
    return self._points

  def point_id(self, p):
    return point_name(p)

  def fingerprint(self, p):
    blob = json.dumps({"config": self._configs[point_name(p)].to_dict(), "seeds": self.seeds},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def compute(self, p, log):
    name = point_name(p)
    return {"records": run_point(self._configs[name], os.path.join(self.workdir, name), self.seeds,
                                 log=log)}

  def write_outputs(self, workdir, data, figures):
    rows = [dict(r, point=d["point"]) for d in data.values() for r in d["records"]]
    write_outputs(workdir, self.sweeps, rows, figures=figures)
    return rows


def run(config, sweeps, seeds, workdir: str, *, log=print) -> list[dict]:
  """Runs (or resumes) every point of the sweep in `workdir`; writes sweep.csv, summary.md and the
  figure after each point.  Returns the sweep.csv records."""
  sweep = SweepStudy(config, sweeps, seeds, workdir)  # every point valid before any work
  os.makedirs(workdir, exist_ok=True)
  jsonfile.write(os.path.join(workdir, "sweep.json"),
                 {"sweeps": [[f, v] for f, v in sweeps], "seeds": sweep.seeds,
                  "config": config.to_dict()}, indent=1, sort_keys=True)
  return study.run(sweep, workdir, log=log)[0]


# -- outputs --------------------------------------------------------------------------------------

def _scalar_metrics(result: dict) -> dict:
  return {k: v for k, v in result.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def write_outputs(workdir: str, sweeps, rows: list[dict], *, figures: bool = True) -> None:
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
  if rows and figures:
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
