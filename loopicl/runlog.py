"""Everything a run writes for people to read: TensorBoard events, metrics.jsonl, a progress bar.

`RunLog` is the one TensorBoard writer (training, the linear report and the concept report all
log through it), with tensorboardX (no TensorFlow).  `metrics.jsonl` holds one JSON
object per evaluation; on resume, lines from steps after the restored checkpoint (written by the
interrupted process after its last save) are dropped, so a resumed run's file is identical to an
uninterrupted run's.  Only process 0 writes (multi-host runs).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from loopicl import jsonfile, stats


class RunLog:
  """TensorBoard writer + metrics.jsonl of one run (no-op on processes other than 0)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=workdir, flush_secs=10)

  def truncate_after(self, step: int) -> None:
    """Drops metrics.jsonl lines with step > `step` (written after the checkpoint we resume)."""
    if not (self.enabled and os.path.exists(self.metrics_path)):
      return
    with open(self.metrics_path) as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
      tmp = self.metrics_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.metrics_path)  # atomic: a crash here leaves the old file whole

  def write_metrics(self, record: dict) -> None:
    if self.enabled:
      with open(self.metrics_path, "a") as f:
        f.write(jsonfile.dumps(record, nonfinite="string", sort_keys=True) + "\n")

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    """Numbers as scalars; a non-finite one is not written (TensorBoard cannot draw it, and
    tensorboardX warns for each) but counted: `<prefix>nonfinite/<name>` = 1 at that step."""
    if self._writer is None:
      return
    for k, v in values.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        if math.isfinite(float(v)):
          self._writer.add_scalar(f"{prefix}{k}", float(v), global_step=step)
        else:
          self._writer.add_scalar(f"{prefix}nonfinite/{k}", 1.0, global_step=step)

  def layout(self, charts: dict[str, dict[str, list[str]]]) -> None:
    """TensorBoard's Custom Scalars tab: {category: {chart title: [tag or regex, …]}}, each chart
    drawing its tags together (log scale is the chart's own toggle in the UI)."""
    if self._writer is not None:
      self._writer.add_custom_scalars(
          {cat: {title: ["Multiline", tags] for title, tags in c.items()} for cat, c in charts.items()})

  def hparams(self, hparams: dict, metric_tags) -> None:
    """Records the run for the HParams tab: `hparams` (name -> bool/str/number) and the scalar
    tags it compares runs by (their values come from the scalars the run logs)."""
    if self._writer is None:
      return
    from tensorboardX.summary import hparams as hparams_summary
    experiment, session_start, _ = hparams_summary(hparams, {tag: 0.0 for tag in metric_tags})
    for summary in (experiment, session_start):  # no session end: the run may be resumed
      self._writer.file_writer.add_summary(summary)

  def figure(self, step: int, tag: str, fig, close: bool = True) -> None:
    if self._writer is None:
      return
    self._writer.add_figure(tag, fig, global_step=step, close=close)

  def text(self, step: int, tag: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=step)

  # -- what a training run records (train.py and sweeps alike) ------------------------------------
  def start_run(self, config, family) -> None:
    """The once-per-run records, at step 0: the config as text, the charts, the HParams entry."""
    self.text(0, "config", "```\n" + json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n```")
    self.layout(family.tensorboard_layout())
    self.hparams(config_hparams(config), family.hparam_metrics)

  def train_chunk(self, step: int, metrics: dict, *, learning_rate: float, steps_per_s: float,
                  loops: int) -> None:
    """A chunk's train scalars (means over its steps): loss, grad_norm, the family's aux metrics,
    `skipped` (the share of non-finite steps skipped); loss and grad_norm over the finite steps."""
    self.scalars(step, {"loss": float(stats.finite_mean(metrics["loss"])[0]),
                        "grad_norm": float(stats.finite_mean(metrics["grad_norm"])[0]),
                        "learning_rate": learning_rate, "steps_per_s": steps_per_s,
                        "loops": loops}, prefix="train/")
    self.scalars(step, {k: float(v.mean()) for k, v in metrics.items()
                        if k not in ("loss", "grad_norm")}, prefix="train/")

  def evaluation(self, step: int, metrics: dict, recent: dict) -> dict:
    """An evaluation's record: metrics.jsonl and eval/ scalars, with `recent` (the last chunk's
    train metrics, [steps] arrays) averaged in as train_loss and train_<aux>.  Returns it."""
    metrics = dict(metrics, step=step)
    for name, values in recent.items():
      name = f"train_{name}" if name != "loss" else "train_loss"
      metrics[name] = float(stats.finite_mean(np.asarray(values, np.float64))[0])
    if not recent:
      metrics["train_loss"] = float("nan")
    self.write_metrics(metrics)
    self.scalars(step, {k: v for k, v in metrics.items() if k != "step"}, prefix="eval/")
    for t, err in enumerate(metrics.get("test_error_per_loop", []), start=1):
      self.scalars(step, {f"test_error_loop_{t:02d}": err}, prefix="eval/per_loop/")
    return metrics

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class ProgressBar:
  """One terminal line: step/total, loss, steps/s, ETA (rewritten in place on a TTY)."""

  def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.t0 = time.time()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_print = 0.0

  def update(self, step: int, loss: float, steps_per_s: float) -> None:
    if not self.enabled:
      return
    now = time.time()
    if not self.tty and now - self._last_print < 5.0 and step < self.total:
      return  # in a log file, one line every few seconds is plenty
    self._last_print = now
    frac = step / max(self.total, 1)
    width = 24
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
    line = f"[{bar}] {step}/{self.total} loss {loss:.3e} {steps_per_s:7.1f} steps/s ETA {eta_s}"
    if self.tty:
      self.stream.write("\r" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


def config_hparams(config, sections=("task", "model", "train")) -> dict:
  """The config's scalar fields as flat hparams ("model.loops": 5, …); nested sections and
  sequences are left out (HParams compares scalars)."""
  out = {}
  for section in sections:
    for name, value in config.get(section, {}).items():
      if isinstance(value, (bool, str, int, float)):
        out[f"{section}.{name}"] = value
  return out


def save_figure(fig, directory: str, name: str, *, dpi: int = 110, **kwargs) -> str:
  """Writes `fig` as <directory>/<name>.png (for reading) and .pdf (vector, for a paper);
  returns the PNG's path.  Every figure a report or grid writes goes through here."""
  path = os.path.join(directory, f"{name}.png")
  with np.errstate(over="ignore"):  # a log axis over a 1e300 error overflows harmlessly
    fig.savefig(path, dpi=dpi, **kwargs)
    fig.savefig(os.path.join(directory, f"{name}.pdf"), **kwargs)
  return path
