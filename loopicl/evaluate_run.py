"""Evaluate a finished (or checkpointed) training run: `evaluation.analyze` on its newest good
checkpoint, written to `<workdir>/eval/` and logged to the run's TensorBoard directory.

  python scripts/evaluate.py --workdir runs/default [--loops_max 40] [--num_prompts 4096]

The trained T is the loop count the checkpoint was training at (`train.loops_at(config, step)`:
model.loops once a loop curriculum is over); baselines are tuned at that T.  Prompts come from
`config.eval.seed` (fold_in 0: reported prompts, fold_in 1: scans — the training evaluator's own
derivation), independent of the training batches.  Only the linear task families
(`tasks.TASK_KINDS`) have a GD construction to compare with; other runs are refused.

Errors a user can fix (no run or checkpoint in --workdir, a checkpoint that does not match its
config, bad flag values) print one line on stderr and exit with status 2 — never a traceback.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from loopicl import evaluation, plots, tasks


def default_loops_max(trained_loops: int) -> int:
  """2·T, at least 40: far enough past T to see whether the learned loop keeps converging."""
  return max(2 * int(trained_loops), 40)


def evaluate_run(workdir: str, loops_max: int | None = None, num_prompts: int = 4096, *,
                 log_tensorboard: bool = True, log=print) -> dict[str, Any]:
  """Analyzes the newest good checkpoint of `workdir`; writes `<workdir>/eval/`; returns the report.

  The report gains `run` = {workdir, step, parameterization, loops}; `<workdir>/eval/` receives
  report.json, report.md, weights.npz and the figures; TensorBoard events go to `workdir` (the
  run's own log directory) under `analysis/…` at the checkpoint's step.
  Raises train.RunError (one line) for a missing/unusable run and ValueError for bad arguments.
  """
  from loopicl import train  # imports Orbax/optax: only needed here
  config, model, step = train.load_trained(workdir)
  if config.task.kind not in tasks.TASK_KINDS:
    return _evaluate_concept_run(config, model, step, workdir, num_prompts, log_tensorboard, log)
  T = int(train.loops_at(config, step))
  loops_max = default_loops_max(T) if loops_max is None else loops_max
  P, Q = (np.asarray(w, np.float64) for w in model.weights())
  report = evaluation.analyze(P, Q, config.task, trained_loops=T, loops_max=loops_max,
                              num_prompts=num_prompts, seed=int(config.eval.seed))
  report["run"] = {"workdir": os.path.abspath(workdir), "step": int(step),
                   "parameterization": str(config.model.parameterization),
                   "loops": int(config.model.loops)}
  outdir = os.path.join(workdir, "eval")
  figures = plots.all_figures(report)
  evaluation.write_report(report, outdir, P, Q, figures=figures)
  if log_tensorboard:
    evaluation.log_to_tensorboard(report, figures, workdir, step)
  log(f"wrote {outdir}/report.md (step {step}, T={T}, loops 1..{loops_max}, "
      f"{num_prompts} prompts, {report['seconds']:.1f} s)")
  for line in report["findings"]:
    log(f"  - {line}")
  return report


def _evaluate_concept_run(config, model, step, workdir, num_prompts, log_tensorboard, log):
  """Concept classification has no GD construction: scores, OOD variants and curves instead."""
  from loopicl import concept_report, runlog
  report = concept_report.analyze(config, model, step, workdir, num_prompts)
  figs = concept_report.figures(report)
  outdir = os.path.join(workdir, "eval")
  concept_report.write(report, outdir, figs)
  if log_tensorboard:
    rl = runlog.RunLog(workdir)
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    for variant, values in report.get("ood", {}).items():
      scalars.update({f"ood_{variant}_{k}": v for k, v in values.items()})
    rl.scalars(step, scalars, prefix="analysis/")
    for name, fig in figs.items():
      rl.figure(step, f"analysis/{name}", fig)
    rl.close()
  log(f"wrote {outdir}/report.md (step {step}, {num_prompts} prompts): test 0-1 "
      f"{report['test_zero_one']:.4g}; OOD " + ", ".join(
          f"{v} {s['zero_one']:.4g}" for v, s in report.get("ood", {}).items()))
  return report
