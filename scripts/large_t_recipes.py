"""Which training recipe makes a T = 20 looped transformer train: the table of docs/reproduction.md.

  python scripts/large_t_recipes.py --workdir runs/large_t            # every recipe (~12 min, 2 cores)
  python scripts/large_t_recipes.py --workdir runs/large_t --recipes window,last_loop

Each recipe is the `configs/reproduce.py` experiment (GD warm start η₀ = 0.1, Adam 2e-3, 100
warm-up steps, cosine, clip 1, loop curriculum +1 loop every 40 steps, batch 64, 1000 steps) with
a few overrides, trained on linear regression at d = 10, n = 40, T = 20 for 4 seeds in one
vmapped program, through `reproduce.run` (so the GD reference is the grid's: best constant step
for T = 20, scanned on separate prompts, on the same 2048 held-out prompts).  Prints, per recipe,
how many seeds diverged and each seed's trained / GD error at T = 20.  Rerunning resumes.
"""
import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
  from loopicl import config as config_lib
  config = config_lib.load_file(os.path.join(ROOT, "configs", "reproduce.py"))
  g = config.grid
  g.kinds, g.ds, g.n_over_d, g.condition_numbers = ("linear_regression",), (10,), (4.0,), (1.0,)
  g.loops, g.fixed_loops, g.weight_loops = tuple(range(1, 21)), 20, ()
  g.trained_loops = (20,) if mode == "per_loops" else tuple(range(1, 21))
  g.train_mode, g.figures = mode, False
  for key, value in overrides.items():
    section, field = key.split(".")
    config.experiment[section][field] = value
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--recipes", default=",".join(RECIPES))
  args = parser.parse_args()
  names = [r for r in args.recipes.split(",") if r]
  unknown = [r for r in names if r not in RECIPES]
  if unknown:
    from loopicl.cli import fail
    fail(f"--recipes={','.join(unknown)} is invalid; allowed: {' | '.join(RECIPES)}")
  from loopicl import distributed, reproduce
  distributed.set_cpu_devices(recipe_config("window", {}).grid.cpu_devices)
  print("| recipe | overrides | diverged | trained / GD at T = 20, per seed |")
  print("|---|---|---|---|")
  for name in names:
    mode, overrides = RECIPES[name]
    workdir = os.path.join(args.workdir, name)
    reproduce.run(recipe_config(mode, overrides), workdir, log=lambda s: None)
    with open(os.path.join(workdir, "results.csv")) as f:
      rows = [r for r in csv.DictReader(f) if r["method"] == "trained" and r["loops"] == "20"]
    ratios = ", ".join("—" if r["diverged"] == "1" else f"{float(r['ratio_to_construction']):.3g}"
                       for r in rows)
    diverged = sum(r["diverged"] == "1" for r in rows)
    desc = f"window (`{mode}`)" if mode == "window" else ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "—"
    print(f"| {name} | {desc} | {diverged}/{len(rows)} | {ratios} |", flush=True)


if __name__ == "__main__":
  main()
