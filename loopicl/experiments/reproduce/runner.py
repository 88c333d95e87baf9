"""The resumable grid loop (`run`) and the rebuild of the workdir's outputs (`write_outputs`).

`run` computes the grid's points in order (`grid.points`), skips each whose file is on disk with
the current fingerprint, writes each new point's file as soon as it finishes, and rebuilds
results.csv, weights.csv and summary.md after every point (the figures once, at the end).
"""
from __future__ import annotations

import os
import time
from typing import Callable

from loopicl import distributed, jsonfile, runlog
from loopicl.experiments.reproduce import compute, figures as figures_lib, outputs, summary
from loopicl.experiments.reproduce.grid import fingerprint, point_id, points, validate


def write_outputs(config, workdir: str, *, figures: bool = True) -> list[dict]:
  """Rebuilds results.csv, weights.csv, n_required.csv, summary.md (and the figures) from the
  finished points."""
  data = compute.load_points(config, workdir)
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
  # Host CPU devices for the seed axis (sweep.seed_mesh); must precede any JAX computation.
  distributed.set_cpu_devices(int(config.grid.get("cpu_devices", 0)))
  os.makedirs(os.path.join(workdir, "points"), exist_ok=True)
  jsonfile.write(os.path.join(workdir, "config.json"), config.to_dict(), indent=2, sort_keys=True,
                 default=list)
  todo = points(config)
  start, computed, skipped = time.time(), 0, 0
  for i, p in enumerate(todo, start=1):
    pid, fp = point_id(p), fingerprint(config, p)
    stored = compute.read_point(workdir, p)
    if stored is not None:
      if stored.get("fingerprint") == fp:
        skipped += 1
        continue
      log(f"[{i}/{len(todo)}] {pid}: settings changed since it was computed; recomputing")
    t0 = time.time()
    log(f"[{i}/{len(todo)}] {pid} ({len(config.grid.seeds)} seeds) ...")
    if p["method"] == "construction":
      data = compute.run_construction(config, p)
    else:
      data = compute.run_trained(config, p, log)
    data.update(point=p, fingerprint=fp, wall_s=time.time() - t0, id=pid)
    compute.write_point(workdir, p, data)
    computed += 1
    elapsed = time.time() - start
    log(f"[{i}/{len(todo)}] {pid} done in {time.time() - t0:.0f} s ({elapsed:.0f} s so far)")
    write_outputs(config, workdir, figures=False)
  rows = write_outputs(config, workdir, figures=bool(config.grid.figures))
  log(f"grid done: {computed} points computed, {skipped} already there, {len(rows)} rows in "
      f"{os.path.join(workdir, 'results.csv')} ({time.time() - start:.0f} s)")
  return {"rows": len(rows), "computed": computed, "skipped": skipped}
