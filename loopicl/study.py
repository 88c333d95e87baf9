"""One study runner: points × seeds, each point computed once, stored, and the outputs rebuilt.

The reproduction grid (experiments/reproduce), the learning table (experiments/learning.py) and
sweeps (experiments/sweep_runs.py) are its clients.  A study supplies:

  points()                 -> [point dict, …] in run order
  point_id(p)              -> its file name: <workdir>/points/<id>.json
  fingerprint(p)           -> a hash of everything the point's numbers depend on: a stored point
                              with another fingerprint is recomputed, never reused
  compute(p, log)          -> the point's data (a JSON-able dict; NaN allowed)
  write_outputs(workdir, data, figures) -> the study's CSV / summary / figures from
                              {id: data} of the current points on disk
  seeds                    the seeds every point trains or reads (for the log line)
  point_key                the data field that holds the point ("point", "setting")

`run` computes the missing points in order, writes each point's file atomically as soon as it is
done (a killed study resumes where it stopped: rerun the same command), rebuilds the outputs after
every point without figures and once more at the end with them.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable


def point_path(workdir: str, point_id: str) -> str:
  return os.path.join(workdir, "points", point_id + ".json")


def read_point(workdir: str, point_id: str) -> dict | None:
  try:
    with open(point_path(workdir, point_id)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def write_point(workdir: str, point_id: str, data: dict) -> None:
  """Writes the point's file atomically: a point is either complete on disk or absent.

  Plain json (not `jsonfile`): a mean over no finite prompt is NaN and must read back as NaN.
  """
  path = point_path(workdir, point_id)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1)
  os.replace(path + ".tmp", path)


def load_points(study, workdir: str) -> dict:
  """{point id: data} for the study's points that are on disk and current (same fingerprint)."""
  out = {}
  for p in study.points():
    pid = study.point_id(p)
    data = read_point(workdir, pid)
    if data is not None and data.get("fingerprint") == study.fingerprint(p):
      out[pid] = data
  return out


def run(study, workdir: str, *, figures: bool = True, log: Callable[[str], None] = print):
  """Runs (or resumes) every point of `study` in `workdir`; returns (the last write_outputs'
  value, points computed, points already there).  Logs a line when a point starts and ends."""
  os.makedirs(os.path.join(workdir, "points"), exist_ok=True)
  todo = study.points()
  start, computed = time.time(), 0
  for i, p in enumerate(todo, start=1):
    pid, fp = study.point_id(p), study.fingerprint(p)
    stored = read_point(workdir, pid)
    if stored is not None:
      if stored.get("fingerprint") == fp:
        continue
      log(f"[{i}/{len(todo)}] {pid}: settings changed since it was computed; recomputing")
    t0 = time.time()
    log(f"[{i}/{len(todo)}] {pid} ({len(study.seeds)} seeds) ...")
    data = study.compute(p, log)
    data.update({study.point_key: p, "fingerprint": fp, "wall_s": time.time() - t0, "id": pid})
    write_point(workdir, pid, data)
    computed += 1
    log(f"[{i}/{len(todo)}] {pid} done in {time.time() - t0:.0f} s "
        f"({time.time() - start:.0f} s so far)")
    study.write_outputs(workdir, load_points(study, workdir), False)
  return study.write_outputs(workdir, load_points(study, workdir), figures), computed, len(todo) - computed
