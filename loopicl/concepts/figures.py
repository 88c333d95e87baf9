"""The concept report's figures (docs/concepts.md), drawn from report.json alone.

  zero_one           0-1 loss vs steps on a log axis, in distribution and every OOD variant, with
                     the fitted exponential rate of the in-distribution loss
  length             final 0-1 loss (log axis) against the prompt length L
  correct_attention  attention mass on the demonstrations sharing the query's sense vs steps,
                     beside its value for uniform attention
  inner_products     largest |inner products| of the MLP and attention weights with the sense
                     directions, their complements in the concept (shared) and noise, vs steps
  mlp_evolution      ⟨w_r, sense direction⟩ of every MLP neuron vs steps, for a flipping and a
                     fixed-polarity concept
  alignment          share of the weights' energy in the concept span vs steps
Every line carries a gid (its curve's key) so tests can check it against the report.
"""
from __future__ import annotations

import math

import numpy as np


def _number(x) -> float:
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def halving(rate_per_step: float) -> float:
  """Steps for the 0-1 loss to halve at a geometric rate r per step (nan unless 0 < r < 1)."""
  return math.log(0.5) / math.log(rate_per_step) if 0 < rate_per_step < 1 else float("nan")


def _axes(title, xlabel, ylabel, log=False):
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if log:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  return fig, ax


def zero_one(report) -> object:
  c, steps = report["curves"], report["curves"]["step"]
  floor = 0.5 / max(report["num_prompts"], 1)  # a 0-1 loss of 0 is drawn at half a prompt
  rate = report["zero_one_rate"]
  r = _number(rate["rate_per_step"])
  fig, ax = _axes(f"0-1 loss vs steps (fit over the run: ×{r:.4g}/step, halves every "
                  f"{halving(r):.3g} steps)", "training step",
                  f"0-1 loss (held-out; 0 drawn at {floor:.1e})", log=True)
  series = [("test_zero_one", "in distribution")] + [
      (k, k[4:-9]) for k in c if k.startswith("ood_") and k.endswith("_zero_one")]
  for key, label in series:
    ax.plot(steps, np.maximum(np.asarray(c[key], float), floor), marker="o", ms=2, label=label,
            gid=key)
  if np.isfinite(r) and np.isfinite(_number(rate.get("log_intercept"))):
    s = np.asarray(steps, float)
    ax.plot(s, np.exp(_number(rate["log_intercept"])) * r ** s, ls="--", color="k", lw=1,
            label="exponential fit (in distribution)", gid="fit")
  ax.legend(fontsize=8)
  return fig


def length(report) -> object:
  lc = report["length_curve"]
  floor = 0.5 / max(report["num_prompts"], 1)
  fig, ax = _axes("0-1 loss vs prompt length (trained at L = "
                  f"{report['task']['n_context']})", "demonstrations L",
                  f"0-1 loss (held-out; 0 drawn at {floor:.1e})", log=True)
  ax.set_xscale("log", base=2)
  ax.plot(lc["n_context"], np.maximum(np.asarray(lc["zero_one"], float), floor), marker="o",
          gid="length_zero_one", label="0-1 loss")
  ax.axvline(report["task"]["n_context"], color="gray", ls=":", label="training length")
  ax.legend()
  return fig


def correct_attention(report) -> object:
  c, steps = report["curves"], report["curves"]["step"]
  fig, ax = _axes("Attention on demonstrations of the query's sense", "training step",
                  "attention mass")
  ax.plot(steps, c["correct_attention"], marker="o", ms=2, gid="correct_attention",
          label="mass on demonstrations with the query's task-concept sense")
  ax.plot(steps, c["correct_attention_uniform"], ls="--", gid="correct_attention_uniform",
          label="the same for uniform attention")
  ax.plot(steps, c["attention_peak"], ls=":", gid="attention_peak", label="largest weight")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  return fig


def inner_products(report) -> object:
  from matplotlib.figure import Figure
  c, steps = report["curves"], report["curves"]["step"]
  fig = Figure(figsize=(11, 4.5))
  for i, (part, title) in enumerate((("mlp", "MLP neurons w_r: max |⟨w_r, u⟩|"),
                                     ("attn", "attention B = W_Qᵀ W_K: max |uᵀ B v|"))):
    ax = fig.add_subplot(1, 2, i + 1)
    for fam, ls in (("sense", "-"), ("shared", "--")):
      for side in ("word", "label"):
        key = f"ip_{part}_{fam}_{side}"
        ax.plot(steps, c[key], ls=ls, gid=key, label=f"{fam} ({side})")
    ax.plot(steps, c[f"ip_{part}_noise"], color="gray", gid=f"ip_{part}_noise", label="noise")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return fig


def mlp_evolution(report) -> object:
  from matplotlib.figure import Figure
  c, steps = report["curves"], report["curves"]["step"]
  K = int(report["task"]["num_concepts"])
  fixed = int(report["task"]["fixed_polarity_concepts"])
  rare = int(report["task"]["rare_concepts"])
  shown = [(min(rare, K - fixed - 1), "flipping, common"), (K - 1, "fixed polarity")]
  if fixed == 0:
    shown[1] = (0, "flipping")
  fig = Figure(figsize=(11, 7))
  for row, side in enumerate(("label", "word")):
    coef = np.asarray(c[f"mlp_sense_{side}"], float)  # [evals, m, K]
    for col, (k, what) in enumerate(shown):
      ax = fig.add_subplot(2, 2, 2 * row + col + 1)
      if coef.ndim == 3 and coef.shape[0]:
        m = coef.shape[1]
        for r in range(m):
          ax.plot(steps, coef[:, r, k], color="C3" if r < m // 2 else "C0", lw=0.8,
                  gid=f"mlp_sense_{side}_{r}_{k}")
      vec = "d" if side == "label" else "b"
      ax.set_title(f"⟨w_r, {vec}_{k}⟩, concept {k} ({what}); red a_r > 0, blue a_r < 0",
                   fontsize=9)
      ax.set_xlabel("training step")
      ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def alignment(report) -> object:
  c, steps = report["curves"], report["curves"]["step"]
  fig, ax = _axes("Alignment with concept directions vs noise directions", "training step",
                  "fraction of weight energy in the concept span")
  for key, label in [("alignment_mlp", "MLP neurons"), ("alignment_attention", "attention")]:
    line, = ax.plot(steps, c[key], marker="o", ms=2, label=f"{label}: concept span", gid=key)
    ax.plot(steps, c[key.replace("alignment_", "alignment_chance_")], ls="--",
            color=line.get_color(), label=f"{label}: random-direction level")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  return fig


def figures(report: dict) -> dict:
  import matplotlib
  matplotlib.use("Agg")
  return {name: draw(report) for name, draw in (
      ("zero_one", zero_one), ("length", length), ("correct_attention", correct_attention),
      ("inner_products", inner_products), ("mlp_evolution", mlp_evolution),
      ("alignment", alignment))}
