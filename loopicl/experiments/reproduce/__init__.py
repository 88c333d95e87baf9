"""Reproduce the source paper's claim in its own regime: the typical prompt, n = O(d) against exp(T).

The claim (docs/theory.md §3): T loops of the looped linear transformer can run T steps of GD, whose
error after T steps is ≤ ρ(κ̂)^T with ρ = (κ̂ − 1)/(κ̂ + 1) and κ̂ the condition number of the
prompt's empirical covariance — bounded with high probability once n is a constant multiple of d,
so no exp(T) examples are needed — while one step tuned for the *mean* over prompts (the
population view) is decided by the rare prompts with a large λ_max(Σ̂).  This package runs the
grid that tests it: the GD construction under five step rules (`step_rules`, in closed form up to
T = 200), a `full` looped transformer trained once at the largest T and read at every T, and the
reference ladder (CG, Chebyshev, Newton–Schulz, whitened GD: `ladder`), all on the same held-out
prompts and all read as distributions (mean, median, q90, q99, fraction below ε).

    python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick

Modules (each owns one part):
  * `grid`: the config's grid — validation (`GridError`), settings, points in run order, point ids,
    the training/task config of a point, and the fingerprint a rerun checks;
  * `ladder`: the reference algorithms scored inside each construction point (`seed_ladder`);
  * `compute`: one point's numbers (`run_construction`, `run_trained`, the held-out prompts and the
    per-prompt error); its file points/<id>.json is the study runner's (loopicl/study.py);
  * `step_rules`: the five step rules of a construction point, the tuned steps' validation and
    the oracle step's bound check;
  * `outputs`: results.csv / weights.csv / n_required.csv rows from the point files, `aggregate`
    over seeds; `summary`: summary.md;
  * `figures`: the PNG figures and the theory line;
  * `runner`: the grid as a study (`GridStudy`, `run`: loopicl/study.py resumes it) and the
    rebuild of every output (`write_outputs`).
The closed form of T GD steps (and the step search) is `loopicl.linear.spectral`'s.
"""
from loopicl.experiments.reproduce.figures import make_figures, theory_line
from loopicl.experiments.reproduce.grid import (TRAIN_MODES, GridError, experiment_config,
                                                fingerprint, n_context, point_id, points,
                                                settings, task_config, train_mode_of, validate)
from loopicl.experiments.reproduce.outputs import (CSV_COLUMNS, N_REQUIRED_COLUMNS, WEIGHT_COLUMNS,
                                                   aggregate, n_required_rows, rows_from_points,
                                                   weight_rows_from_points)
from loopicl.experiments.reproduce.summary import headline_table, summary_markdown
from loopicl.experiments.reproduce.step_rules import METHODS as STEP_RULES
from loopicl.experiments.reproduce.ladder import METHODS as LADDER_METHODS
from loopicl.experiments.reproduce.compute import (eval_prompts, per_prompt_error,
                                                   run_construction, run_trained)
from loopicl.experiments.reproduce.runner import GridStudy, load_points, run, write_outputs

__all__ = [
    "CSV_COLUMNS", "GridStudy", "LADDER_METHODS", "N_REQUIRED_COLUMNS", "STEP_RULES", "n_required_rows", "TRAIN_MODES", "WEIGHT_COLUMNS", "GridError", "aggregate",
    "eval_prompts", "experiment_config", "fingerprint", "headline_table", "load_points",
    "make_figures", "n_context", "per_prompt_error", "point_id", "points", "rows_from_points",
    "run", "run_construction", "run_trained", "settings", "summary_markdown", "task_config",
    "theory_line", "train_mode_of", "validate", "weight_rows_from_points", "write_outputs",
]
