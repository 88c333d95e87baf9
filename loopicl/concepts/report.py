"""Evaluation report of a concept-classification run (docs/theory.md §5, Bu et al. 2024).

From the newest checkpoint: 0-1 loss and cross-entropy in distribution and on every OOD variant
(length_short, length_long, skewed, switched, unseen), the 0-1 loss against the prompt length,
the attention mass on the demonstrations of the query's sense, the inner products of the weights
with concept and noise directions and the concept/noise alignment (concept_model.evaluate).  From
the run's metrics.jsonl: the same quantities against training steps — the paper's figures
(figures.py) — and the exponential rate of the in-distribution 0-1 loss, r in
0-1(step) ≈ C·r^step, fitted by least squares on log(0-1) over the whole run: every evaluation
above the resolution floor of 5 wrong prompts (below it the loss is counting noise; 0 has no
log).  `zero_one_rate_until_floor` is the same fit cut where the loss first reaches the floor
(the early phase only).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from loopicl import jsonfile, runlog
from loopicl.concepts import figures as concept_figures, model as concept_model

figures = concept_figures.figures
_number, _halving = concept_figures._number, concept_figures.halving


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def geometric_rate(steps, zero_one, floor: float = 0.0, until_floor: bool = False) -> dict:
  """Least-squares fit of log(0-1) = log C + step·log r over the evaluations whose 0-1 loss is
  above `floor` (with `until_floor`, only those before it first reaches `floor`).

  Returns {"rate_per_step", "rate_per_1000_steps", "log_intercept" (log C), "r2" (of the fit on
  the log scale), "points", "first_step", "last_step"}; nan (points < 2) when undefined.
  """
  steps, zero_one = np.asarray(steps, float), np.asarray(zero_one, float)
  if until_floor:
    below = zero_one <= floor
    cut = np.argmax(below) if np.any(below) else len(zero_one)
    steps, zero_one = steps[:cut], zero_one[:cut]
  ok = np.isfinite(zero_one) & (zero_one > floor) & np.isfinite(steps)
  s, y = steps[ok], np.log(np.where(ok, zero_one, 1.0)[ok])
  nan = float("nan")
  if ok.sum() < 2 or np.ptp(s) == 0:
    return {"rate_per_step": nan, "rate_per_1000_steps": nan, "log_intercept": nan, "r2": nan,
            "points": int(ok.sum()), "first_step": nan, "last_step": nan}
  slope, intercept = np.polyfit(s, y, 1)
  resid = y - (intercept + slope * s)
  ss = float(np.sum((y - y.mean()) ** 2))
  return {"rate_per_step": float(math.exp(slope)), "rate_per_1000_steps": float(math.exp(1000 * slope)),
          "log_intercept": float(intercept), "r2": 1.0 - float(np.sum(resid ** 2)) / ss if ss > 0 else nan,
          "points": int(ok.sum()), "first_step": float(s[0]), "last_step": float(s[-1])}


_SCALARS = ("test_zero_one", "test_cross_entropy", "correct_attention", "correct_attention_uniform",
            "attention_peak", "alignment_mlp", "alignment_attention", "alignment_chance_mlp",
            "alignment_chance_attention") + tuple(
                f"ip_{p}_{f}_{s}" for p in ("mlp", "attn") for f in ("sense", "shared")
                for s in ("word", "label")) + ("ip_mlp_noise", "ip_attn_noise")


def curves(records: list[dict]) -> dict:
  """Per-evaluation series from metrics.jsonl: steps and everything the figures draw."""
  out = {"step": [r["step"] for r in records]}
  for key in _SCALARS:
    out[key] = [_number(r.get(key)) for r in records]
  for key in ("mlp_sense_word", "mlp_sense_label"):
    out[key] = [r.get(key) for r in records]
  for v in sorted({v for r in records for v in r.get("ood", {})}):
    out[f"ood_{v}_zero_one"] = [_number(r.get("ood", {}).get(v, {}).get("zero_one")) for r in records]
  return out


def analyze(config, model, step: int, workdir: str, num_prompts: int) -> dict:
  """The concept run's report: final held-out scores, curves over training and the fitted rate."""
  import jax
  final = concept_model.evaluate(model, config.task, jax.random.key(int(config.eval.seed)), num_prompts)
  report = dict(final)
  report.update({"step": int(step), "num_prompts": int(num_prompts), "task": config.task.to_dict(),
                 "train": {k: config.train[k] for k in ("optimizer", "learning_rate", "schedule",
                                                         "momentum", "steps", "batch_size")},
                 "curves": curves(_records(workdir))})
  c = report["curves"]
  floor = 5.0 / int(config.eval.num_prompts)  # below 5 wrong prompts: counting noise
  report["zero_one_rate"] = geometric_rate(c["step"], c["test_zero_one"], floor)
  report["zero_one_rate_until_floor"] = geometric_rate(c["step"], c["test_zero_one"], floor,
                                                       until_floor=True)
  return report


def _rate_line(name: str, fit: dict) -> str:
  r = _number(fit["rate_per_step"])
  return (f"- {name}: ×{r:.5g} per step (halves every {_halving(r):.3g} steps), r² = "
          f"{_number(fit['r2']):.3f} on log(0-1), {fit['points']} evaluations, steps "
          f"{_number(fit['first_step']):.0f}–{_number(fit['last_step']):.0f}")


def write(report: dict, outdir: str, figs: dict) -> None:
  os.makedirs(outdir, exist_ok=True)
  jsonfile.write(os.path.join(outdir, "report.json"), report, indent=1, sort_keys=True)
  lines = [f"# Concept ICL evaluation (step {report['step']}, {report['num_prompts']} prompts)", "",
           "| prompts | 0-1 loss | cross-entropy |", "|---|---|---|",
           f"| in distribution | {report['test_zero_one']:.4g} | {report['test_cross_entropy']:.4g} |"]
  for v, s in report.get("ood", {}).items():
    worst = f" (worst length {s['worst_zero_one']:.4g})" if "worst_zero_one" in s else ""
    lines.append(f"| OOD: {v} | {s['zero_one']:.4g}{worst} | {s['cross_entropy']:.4g} |")
  lc = report["length_curve"]
  lines += ["", "| L | " + " | ".join(str(L) for L in lc["n_context"]) + " |",
            "|---" * (len(lc["n_context"]) + 1) + "|",
            "| 0-1 loss | " + " | ".join(f"{z:.4g}" for z in lc["zero_one"]) + " |", "",
            f"- correct attention: {report['correct_attention']:.3g} (uniform attention: "
            f"{report['correct_attention_uniform']:.3g}); largest weight {report['attention_peak']:.3g}",
            _rate_line("0-1 loss exponential rate, whole run", report["zero_one_rate"]),
            _rate_line("same, until it first reaches 5 wrong prompts", report["zero_one_rate_until_floor"])]
  for k in sorted(k for k in report if k.startswith(("alignment_", "ip_"))):
    lines.append(f"- {k}: {report[k]:.3g}")
  with open(os.path.join(outdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for name, fig in figs.items():
    runlog.save_figure(fig, outdir, name, bbox_inches="tight")
