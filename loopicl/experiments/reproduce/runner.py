"""The grid as a client of the study runner (loopicl/study.py), and the rebuild of its outputs.

`run` computes the grid's points in order (`grid.points`), skips each whose file is on disk with
the current fingerprint, writes each new point's file as soon as it finishes, and rebuilds
results.csv, weights.csv, n_required.csv and summary.md after every point (the figures once, at
the end).
"""
from __future__ import annotations

import os
import time
from typing import Callable

from loopicl import distributed, jsonfile, runlog, study
from loopicl.experiments.reproduce import compute, figures as figures_lib, outputs, summary
from loopicl.experiments.reproduce.grid import fingerprint, point_id, points, validate


class GridStudy:
  """The reproduction grid's points for the study runner."""
  point_key = "point"

  def __init__(self, config):
    self.config = config
    self.seeds = list(config.grid.seeds)

  def points(self):
    return points(self.config)

  def point_id(self, p):
    return point_id(p)

  def fingerprint(self, p):
    return fingerprint(self.config, p)

  def compute(self, p, log):
    if p["method"] == "construction":
      return compute.run_construction(self.config, p)
    return compute.run_trained(self.config, p, log)

  def write_outputs(self, workdir, data, figures):
    return _write(self.config, workdir, data, figures)


def load_points(config, workdir: str) -> dict:
  """point id -> point data, for the grid's points that are on disk and current."""
  return study.load_points(GridStudy(config), workdir)


def write_outputs(config, workdir: str, *, figures: bool = True) -> list[dict]:
  """Rebuilds results.csv, weights.csv, n_required.csv, summary.md (and the figures) from the
  finished points."""
  return _write(config, workdir, load_points(config, workdir), figures)


def _write(config, workdir: str, data: dict, figures: bool) -> list[dict]:
  rows = outputs.rows_from_points(config, data)
  weight_rows = outputs.weight_rows_from_points(config, data)
  outputs.write_csv(os.path.join(workdir, "weights.csv"), outputs.WEIGHT_COLUMNS, weight_rows)
  outputs.write_csv(os.path.join(workdir, "results.csv"), outputs.CSV_COLUMNS, rows)
  outputs.write_csv(os.path.join(workdir, "n_required.csv"), outputs.N_REQUIRED_COLUMNS,
                    outputs.n_required_rows(config, rows))
  tmp = os.path.join(workdir, "summary.md.tmp")  # atomic, like the CSVs: never a half-written file
  with open(tmp, "w") as f:
    f.write(summary.summary_markdown(config, rows))
  os.replace(tmp, os.path.join(workdir, "summary.md"))
  if figures and rows:
    for name, fig in figures_lib.make_figures(config, rows, weight_rows).items():
      runlog.save_figure(fig, workdir, name)
  return rows


def run(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the grid in `workdir`; returns {"rows": n, "computed": n, "skipped": n}."""
  validate(config)
  # Host CPU devices for the seed axis (step.seed_mesh); must precede any JAX computation.
  distributed.set_cpu_devices(int(config.grid.cpu_devices))
  os.makedirs(workdir, exist_ok=True)
  jsonfile.write(os.path.join(workdir, "config.json"), config.to_dict(), indent=2, sort_keys=True,
                 default=list)
  start = time.time()
  rows, computed, skipped = study.run(GridStudy(config), workdir, figures=bool(config.grid.figures),
                                      log=log)
  log(f"grid done: {computed} points computed, {skipped} already there, {len(rows)} rows "
      f"in {os.path.join(workdir, 'results.csv')} ({time.time() - start:.0f} s)")
  return {"rows": len(rows), "computed": computed, "skipped": skipped}
