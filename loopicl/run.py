"""The run directory: what a training run writes besides its logs, and how tools read it back.

  <workdir>/config.json          the config of the latest launch (earlier ones as config.<time>.json)
  <workdir>/checkpoints/<step>/  Orbax checkpoints with checksums (checkpointing.py)
  <workdir>/metrics.jsonl, events.out.tfevents.*   (runlog.py)
  <workdir>/eval/                the offline report (scripts/evaluate.py)

`prepare_workdir` refuses to resume a run whose parameter shapes would change; `load_trained`
restores the newest good checkpoint for evaluation (read-only: it never moves or writes a file);
`summary` is the closing text of a run; `StopRequest` turns SIGTERM/SIGINT into a clean stop.
"""
from __future__ import annotations

import json
import os
import signal
import time

import ml_collections

from loopicl import checkpointing, config as config_lib, family as family_lib
from loopicl.errors import RunError


def prepare_workdir(config, workdir: str, log) -> None:
  """Writes config.json; refuses a config whose shape fields differ from the stored one."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    changed = config_lib.shape_field_differences(stored, config)
    if changed:
      old = ml_collections.ConfigDict(stored)
      fields = ", ".join(f"{f} (stored {config_lib.get_dotted(old, f)!r}, "
                         f"now {config_lib.get_dotted(config, f)!r})" for f in changed)
      raise RunError(f"workdir {workdir} holds a run with another shape: {fields}; "
                     "use a new --workdir or the stored values")
    diffs = config_lib.differences(stored, config)
    if diffs:
      backup = os.path.join(workdir, f"config.{int(time.time())}.json")
      os.replace(path, backup)  # keep the old config: nothing written is lost
      log(f"config changed since the last launch ({'; '.join(diffs)}); previous config kept in "
          f"{os.path.basename(backup)}")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each chunk (then saves and exits)."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with whoever owns them
        pass
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{workdir} holds no config.json: not a loopicl run directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str):
  """(config, model, step) of the newest good checkpoint in `workdir`.

  Raises RunError (one line) when there is no config or checkpoint, or when no checkpoint
  matches the config's shapes.  Builds the model only: no training step, so no kernel.
  """
  from loopicl import train
  config = load_config(workdir)
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise RunError(f"{workdir}/config.json is invalid: {e}") from None
  family = family_lib.of(config)
  model_def, state = train.init_state(family, train.family_optimizer(family), config.train.seed)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise RunError(f"{workdir} holds no checkpoint (expected {directory}/<step>/)")
  ckpt = checkpointing.Checkpointer(directory, int(config.checkpoint.keep))
  try:
    step, restored = ckpt.restore_latest(state, log=lambda *a: None, quarantine=False)
  finally:
    ckpt.close()
  if restored is None:
    raise RunError(f"no checkpoint in {directory} can be restored with the shapes of "
                   f"{workdir}/config.json (mismatched or corrupt)")
  return config, model_def.merge(restored["params"]), int(step)


def evaluate_run(workdir: str, loops_max: int | None = None, num_prompts: int = 4096, *,
                 log_tensorboard: bool = True, log=print) -> dict:
  """The family's offline report of the newest good checkpoint of `workdir` (scripts/evaluate.py):
  written to `<workdir>/eval/`, logged to the run's TensorBoard under `analysis/`, returned.

  Raises RunError (one line) for a missing/unusable run and ValueError for bad arguments.
  """
  config, model, step = load_trained(workdir)
  family = family_lib.of(config)
  return family.report(workdir, model, step, loops_max=loops_max, num_prompts=num_prompts,
                       log_tensorboard=log_tensorboard, log=log)


def summary(result: dict, config) -> str:
  """The run's closing lines: what it reached (the family's lines), e.g. next to the GD baseline."""
  lines = [f"== loopicl run: {config.task.kind}, T={config.model.loops} loops, step {result.get('step')}"]
  if "interrupted" in result:
    lines.append(f"   interrupted by {result['interrupted']}; checkpoint saved, rerun to resume")
  lines += family_lib.of(config).summary_lines(result)
  return "\n".join(lines)
