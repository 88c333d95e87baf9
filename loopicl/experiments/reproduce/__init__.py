"""Reproduce the source paper's claim: n = O(d) examples suffice, error falls geometrically in T.

The claim (docs/theory.md §3): T loops of the looped linear transformer can run T steps of GD, whose
error after T steps is ≤ ρ(κ̂)^T with ρ = (κ̂ − 1)/(κ̂ + 1) and κ̂ the condition number of the
prompt's empirical covariance — bounded once n is a constant multiple of d, so no exp(T)
examples are needed.  This package runs the grid that tests it, for two methods: the exact GD
construction with the best constant step for each (task, n, T), and a `full` looped transformer
trained at that T (or once at the largest T and read at every T), on the same held-out prompts —
with the reference ladder beside them (CG, Chebyshev, Newton–Schulz, whitened GD: `ladder`).

    python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick

Modules (each owns one part):
  * `grid`: the config's grid — validation (`GridError`), settings, points in run order, point ids,
    the training/task config of a point, and the fingerprint a rerun checks;
  * `ladder`: the reference algorithms scored inside each construction point (`seed_ladder`);
  * `compute`: one point's numbers (`run_construction`, `run_trained`, the held-out prompts and the
    per-prompt error) and its file points/<id>.json (`read_point`, `write_point`, `load_points`);
  * `outputs`: results.csv / weights.csv rows from the point files, `aggregate` over seeds, and
    summary.md (`headline_table`, `summary_markdown`);
  * `figures`: the PNG figures and the theory line;
  * `runner`: the resumable loop (`run`) and the rebuild of every output (`write_outputs`).
The GD engine (error after every step for many step sizes, the best constant step for many T at
once) is `loopicl.linear.construction`'s.
"""
from loopicl.experiments.reproduce.figures import make_figures, theory_line
from loopicl.experiments.reproduce.grid import (TRAIN_MODES, GridError, experiment_config,
                                                fingerprint, n_context, point_id, points,
                                                settings, task_config, train_mode_of, validate)
from loopicl.experiments.reproduce.outputs import (CSV_COLUMNS, WEIGHT_COLUMNS, aggregate,
                                                   headline_table, rows_from_points,
                                                   summary_markdown, weight_rows_from_points)
from loopicl.experiments.reproduce.ladder import METHODS as LADDER_METHODS
from loopicl.experiments.reproduce.compute import (eval_prompts, load_points, per_prompt_error,
                                                   run_construction, run_trained)
from loopicl.experiments.reproduce.runner import run, write_outputs

__all__ = [
    "CSV_COLUMNS", "LADDER_METHODS", "TRAIN_MODES", "WEIGHT_COLUMNS", "GridError", "aggregate",
    "eval_prompts", "experiment_config", "fingerprint", "headline_table", "load_points",
    "make_figures", "n_context", "per_prompt_error", "point_id", "points", "rows_from_points",
    "run", "run_construction", "run_trained", "settings", "summary_markdown", "task_config",
    "theory_line", "train_mode_of", "validate", "weight_rows_from_points", "write_outputs",
]
