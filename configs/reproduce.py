"""The full reproduction grid: the paper's claim in its own regime, ~31 min on a 2-core CPU.

Both task kinds; n/d ∈ {1, 1.5, 2, 4, 8} at d ∈ {5, 10, 20, 40, 80} (κ_Σ = 1) for the GD
construction's step rules in closed form at T up to 200 (the tuned-step rules at d ≤ 20:
`grid.tuned_max_d`; their 2 × 65 536-prompt scans are O(d³) per prompt); at d = 10
(`grid.trained_ds`) also κ_Σ ∈ {10, 100} at n/d = 4, label noise σ = 0.5 over the n/d sweep
(linear regression), trained models — from random initialisation with the default recipe (at
n/d ∈ {2, 8}: one per setting, trained at T = 20 with the loss on every loop, read at every
T ≤ 20) — and the reference ladder; 4 seeds × 2048 held-out prompts, all seeds of a trained
point in one vmapped program (loopicl/sweep.py) on one CPU device (the fused kernel).  The
GD-warm-started grid: configs/reproduce_warm.py.  The docs figures
(docs/reproduction.md) come from this grid.  Rerunning the same command resumes (finished
points in <workdir>/points/ are skipped).

  python scripts/reproduce.py --config configs/reproduce.py --workdir runs/reproduce
"""
import ml_collections

from configs import default


def experiment() -> ml_collections.ConfigDict:
  """The training recipe of every trained point (task.kind/d/n/κ and model.loops set per point):
  the default's, from random initialisation (configs/default.py, docs/learning.md) — its step
  count and candidate pool follow T, κ_Σ, d and n.  With `grid.train_mode = "window"` the grid sets
  the loss to the MSE of *every* loop, each divided by GD's error after as many steps
  (`loss_normalization = "gd"`), so one model trained at T = 20 is read at every T ≤ 20.  The GD
  warm start the grid was first measured with is configs/reproduce_warm.py.
  """
  return default.get_config()


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = experiment()  # the training config template (configs/default.py fields)

  config.grid = ml_collections.ConfigDict()
  config.grid.kinds = ("linear_regression", "vector_generation")
  config.grid.ds = (5, 10, 20, 40, 80)          # input dimension d (the n/d sweep at κ_Σ = 1)
  config.grid.n_over_d = (1.0, 1.5, 2.0, 4.0, 8.0)  # n = round(n/d · d) context examples
  config.grid.condition_numbers = (1.0, 10.0, 100.0)  # κ_Σ; κ_Σ > 1 only at fixed_n_over_d, trained_ds
  config.grid.loops = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200)  # T of the step rules
  config.grid.trained_loops = (1, 2, 3, 5, 7, 10, 15, 20)  # T the trained models are read at (⊆ loops);
                                                # per_loops mode trains one model per T here
  config.grid.seeds = (0, 1, 2, 3)              # seeds: init + training data + held-out prompts
  config.grid.fixed_loops = 10                  # T of the error-vs-n/d and error-vs-κ_Σ figures
  config.grid.fixed_n_over_d = 4.0              # n/d of the error-vs-κ_Σ figure
  config.grid.eval_prompts = 2048               # held-out test prompts per seed (and as many to scan η)
  config.grid.eval_seed = 1234                  # seed of the held-out prompts (fold_in'd with the seed)
  config.grid.train_mode = "window"             # window: one model at max T, loss on every loop, read at
                                                # every T | per_loops: one model per T, last-loop loss
  config.grid.condition_train_mode = "per_loops"  # κ_Σ > 1 (read at fixed_loops only): last-loop loss —
                                                # the window loss diverged there (an earlier grid)
  config.grid.weight_loops = ()                 # window: also train at these T (n/d = fixed_n_over_d) for
                                                # the weights-vs-T figure (weights.csv; no error rows)
  config.grid.cpu_devices = 0                   # host CPU devices the seeds are split over (0: one,
                                                # where the fused CPU kernel trains them)
  config.grid.figures = True                    # write the PNG figures into the workdir
  config.grid.trained_ds = (10,)                # d with trained models, κ_Σ > 1 and noisy settings
  config.grid.trained_n_over_d = (2.0, 8.0)     # n/d with trained models at κ_Σ = 1 (4.0 too: +2 min)
  config.grid.noise_stds = (0.5,)               # σ > 0: construction n/d sweeps with label noise …
  config.grid.noise_kinds = ("linear_regression",)  # … for these task kinds
  config.grid.scan_prompts = 65536              # prompts the tuned constant steps are tuned on …
  config.grid.validation_prompts = 32768        # … and validated on (a separate set; 65 536: +2.5 min)
  config.grid.step_shoulder = 1.1               # tuned step: smallest η with scan mean ≤ 1.1 × optimum
  config.grid.ladder = ("cg", "chebyshev", "newton")  # reference rungs (T ≤ max trained T); whitened_gd
                                                # duplicates pgd here and costs ~15 s a point
  config.grid.tuned_max_d = 20                  # tuned rules (65 536-prompt scans) at d ≤ 20 only: cost
  config.grid.epsilon = 1e-3                    # target: error ≤ ε × error at T = 0 (n_required.csv)
  return config
