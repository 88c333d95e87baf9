"""Which training recipe makes a T = 20 looped transformer train: the table of docs/reproduction.md.

Each recipe is the `configs/reproduce_warm.py` experiment (GD warm start η₀ = 0.1, Adam 2e-3, 100
warm-up steps, cosine, clip 1, loop curriculum +1 loop every 40 steps, batch 64, 1000 steps) with
a few overrides, trained on linear regression at d = 10, n = 40, T = 20 for 4 seeds in one
vmapped program, through `reproduce.run` (so the GD reference is the grid's: best constant step
for T = 20, scanned on separate prompts, on the same 2048 held-out prompts).  `run` prints, per
recipe, how many seeds diverged and each seed's trained / GD error at T = 20.  Rerunning resumes.
scripts/large_t_recipes.py is the command line (cli.run_large_t_recipes).
"""
from __future__ import annotations

import csv
import os

from configs import reproduce_warm as reproduce_config

# name -> (grid.train_mode, experiment overrides)
RECIPES = {
    "last_loop": ("per_loops", {}),
    "last_5_loops": ("per_loops", {"train.loss_loops": 5}),
    "construction_phase_300": ("per_loops", {"train.construction_steps": 300}),
    "construction_phase_800": ("per_loops", {"train.construction_steps": 800}),
    "construction_blocks_only": ("per_loops", {"train.construction_steps": 1000}),
    "window": ("window", {}),
}


def recipe_config(mode: str, overrides: dict):
  """The reproduce config of one recipe: one setting (d = 10, n = 40, κ_Σ = 1), T = 1..20."""
  config = reproduce_config.get_config()
  g = config.grid
  g.kinds, g.ds, g.n_over_d, g.condition_numbers = ("linear_regression",), (10,), (4.0,), (1.0,)
  g.loops, g.fixed_loops, g.weight_loops = tuple(range(1, 21)), 20, ()
  g.trained_loops = (20,) if mode == "per_loops" else tuple(range(1, 21))
  g.train_mode, g.figures = mode, False
  for key, value in overrides.items():
    section, field = key.split(".")
    config.experiment[section][field] = value
  return config


def run(workdir: str, names, log=print) -> None:
  """Runs (or resumes) each recipe in <workdir>/<name> and logs one markdown table row each."""
  from loopicl import distributed
  from loopicl.experiments import reproduce
  distributed.set_cpu_devices(recipe_config("window", {}).grid.cpu_devices)
  log("| recipe | overrides | diverged | trained / GD at T = 20, per seed |")
  log("|---|---|---|---|")
  for name in names:
    mode, overrides = RECIPES[name]
    recipe_dir = os.path.join(workdir, name)
    reproduce.run(recipe_config(mode, overrides), recipe_dir, log=lambda s: None)
    with open(os.path.join(recipe_dir, "results.csv")) as f:
      rows = [r for r in csv.DictReader(f) if r["method"] == "trained" and r["loops"] == "20"]
    ratios = ", ".join("—" if r["diverged"] == "1" else f"{float(r['ratio_to_construction']):.3g}"
                       for r in rows)
    diverged = sum(r["diverged"] == "1" for r in rows)
    desc = (f"window (`{mode}`)" if mode == "window"
            else ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "—")
    log(f"| {name} | {desc} | {diverged}/{len(rows)} | {ratios} |")
