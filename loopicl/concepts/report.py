"""Evaluation report of a concept-classification run (docs/theory.md §5, Bu et al. 2024).

From the newest checkpoint: 0-1 loss and cross-entropy in distribution and on every OOD variant,
the attention mass on the "correct" demonstrations, and the concept/noise alignment of the weights
(concept_model.evaluate).  From the run's metrics.jsonl: the same quantities against training
steps — the paper's figures — and the fitted geometric rate of the 0-1 loss, r in
0-1(step) ≈ C·r^step, fitted by least squares on log(0-1) over the evaluations before it first
falls to 5 wrong prompts of the evaluation set (below that it is counting noise; 0 has no log).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from loopicl import jsonfile, runlog, stats
from loopicl.concepts import model as concept_model


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _number(x) -> float:
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def _halving(rate_per_step: float) -> float:
  """Steps for the 0-1 loss to halve at a geometric rate r per step (nan unless 0 < r < 1)."""
  return math.log(0.5) / math.log(rate_per_step) if 0 < rate_per_step < 1 else float("nan")


def geometric_rate(steps, zero_one, floor: float = 0.0) -> dict:
  """Fit log(0-1) = log C + step·log r over the evaluations before the 0-1 loss first reaches
  `floor` (0, or the resolution of the evaluation set: a handful of wrong prompts is counting
  noise, not a rate).

  Returns {"rate_per_step", "rate_per_1000_steps", "points"} (nan when fewer than 2 points).
  """
  steps, zero_one = np.asarray(steps, float), np.asarray(zero_one, float)
  below = zero_one <= floor
  first_zero = np.argmax(below) if np.any(below) else len(zero_one)
  s, z = steps[:first_zero], zero_one[:first_zero]
  points = int(np.sum(np.isfinite(z) & (z > 0)))
  slope = stats.log_linear_slope(s, z)
  if slope is None:
    return {"rate_per_step": float("nan"), "rate_per_1000_steps": float("nan"), "points": points}
  return {"rate_per_step": float(math.exp(slope)), "rate_per_1000_steps": float(math.exp(1000 * slope)),
          "points": points}


def curves(records: list[dict]) -> dict:
  """Per-evaluation series from metrics.jsonl: steps and every scalar the figures draw."""
  out = {"step": [r["step"] for r in records]}
  keys = ["test_zero_one", "test_cross_entropy", "correct_attention", "alignment_mlp",
          "alignment_attention", "alignment_chance_mlp", "alignment_chance_attention"]
  variants = sorted({v for r in records for v in r.get("ood", {})})
  for key in keys:
    out[key] = [_number(r.get(key)) for r in records]
  for v in variants:
    out[f"ood_{v}_zero_one"] = [_number(r.get("ood", {}).get(v, {}).get("zero_one")) for r in records]
  return out


def figures(report: dict) -> dict:
  """The paper's figures, drawn from the report alone."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  c = report["curves"]
  steps = c["step"]
  floor = 0.5 / max(report["num_prompts"], 1)  # a 0-1 loss of 0 is drawn at half a prompt

  fig01 = Figure(figsize=(7, 4.5))
  ax = fig01.add_subplot()
  series = [("test_zero_one", "in distribution")] + [
      (k, k[4:-9]) for k in c if k.startswith("ood_") and k.endswith("_zero_one")]
  for key, label in series:
    ax.plot(steps, np.maximum(np.asarray(c[key], float), floor), marker="o", ms=3, label=label, gid=key)
  ax.set_yscale("log")
  ax.set_xlabel("training step")
  ax.set_ylabel(f"0-1 loss (held-out; 0 drawn at {floor:.1e})")
  rate = _number(report["zero_one_rate"]["rate_per_step"])  # None in JSON when undefined
  ax.set_title(f"0-1 loss vs steps (fitted: ×{rate:.4g} per step, halves every {_halving(rate):.3g} steps)")
  ax.grid(alpha=0.3)
  ax.legend()

  figatt = Figure(figsize=(7, 4.5))
  ax = figatt.add_subplot()
  ax.plot(steps, c["correct_attention"], marker="o", ms=3, gid="correct_attention",
          label="attention on demonstrations sharing the query's task-concept sign")
  ax.set_xlabel("training step")
  ax.set_ylabel("attention mass")
  ax.set_ylim(0, 1)
  ax.set_title("Correct attention vs steps")
  ax.grid(alpha=0.3)
  ax.legend()

  figal = Figure(figsize=(7, 4.5))
  ax = figal.add_subplot()
  for key, label in [("alignment_mlp", "MLP neurons"), ("alignment_attention", "attention weights")]:
    line, = ax.plot(steps, c[key], marker="o", ms=3, label=f"{label}: concept span", gid=key)
    chance = c[key.replace("alignment_", "alignment_chance_")]
    ax.plot(steps, chance, ls="--", color=line.get_color(), label=f"{label}: random-direction level")
  ax.set_xlabel("training step")
  ax.set_ylabel("fraction of weight norm in the concept span")
  ax.set_ylim(0, 1)
  ax.set_title("Alignment with concept directions vs noise directions")
  ax.grid(alpha=0.3)
  ax.legend()
  return {"zero_one": fig01, "correct_attention": figatt, "alignment": figal}


def analyze(config, model, step: int, workdir: str, num_prompts: int) -> dict:
  """The concept run's report: final held-out scores, curves over training and the fitted rate."""
  import jax
  final = concept_model.evaluate(model, config.task, jax.random.key(int(config.eval.seed)), num_prompts)
  recs = _records(workdir)
  report = dict(final)
  report.update({"step": int(step), "num_prompts": int(num_prompts), "task": config.task.to_dict(),
                 "curves": curves(recs)})
  # Below 5 wrong prompts out of num_prompts the 0-1 loss is counting noise: fit above that.
  report["zero_one_rate"] = geometric_rate(report["curves"]["step"], report["curves"]["test_zero_one"],
                                           floor=5.0 / int(config.eval.num_prompts))
  return report


def write(report: dict, outdir: str, figs: dict) -> None:
  os.makedirs(outdir, exist_ok=True)
  jsonfile.write(os.path.join(outdir, "report.json"), report, indent=1, sort_keys=True)
  lines = [f"# Concept ICL evaluation (step {report['step']}, {report['num_prompts']} prompts)", "",
           "| prompts | 0-1 loss | cross-entropy |", "|---|---|---|",
           f"| in distribution | {report['test_zero_one']:.4g} | {report['test_cross_entropy']:.4g} |"]
  for v, s in report.get("ood", {}).items():
    lines.append(f"| OOD: {v} | {s['zero_one']:.4g} | {s['cross_entropy']:.4g} |")
  lines += ["", f"- correct attention: {report['correct_attention']:.3g}",
            f"- 0-1 loss geometric rate: ×{_number(report['zero_one_rate']['rate_per_step']):.4g} per step, "
            f"halves every {_halving(_number(report['zero_one_rate']['rate_per_step'])):.3g} steps "
            f"({report['zero_one_rate']['points']} evaluations before it reached 5 wrong prompts)"]
  for k in sorted(k for k in report if k.startswith("alignment_")):
    lines.append(f"- {k}: {report[k]:.3g}")
  with open(os.path.join(outdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for name, fig in figs.items():
    runlog.save_figure(fig, outdir, name, bbox_inches="tight")
