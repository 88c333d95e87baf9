"""The run directory: what a training run writes besides its logs, and how tools read it back.

  <workdir>/.lock                held (flock) by the run training in it: one writer per workdir
  <workdir>/config.json          the config of the latest launch (earlier ones as config.<time>.json)
  <workdir>/checkpoints/<step>/  Orbax checkpoints with checksums (checkpointing.py)
  <workdir>/metrics.jsonl, events.out.tfevents.*   (runlog.py)
  <workdir>/eval/                the offline report (scripts/evaluate.py)

`WorkdirLock` lets one launch at a time train in a workdir; `prepare_workdir` refuses to resume a
run whose parameter shapes would change; `load_trained` restores the newest good checkpoint for
evaluation (read-only: it never moves or writes a file, and takes no lock);
`summary` is the closing text of a run; `StopRequest` turns SIGTERM/SIGINT into a clean stop.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time

import ml_collections

from loopicl import checkpointing, config as config_lib, registry, optim
from loopicl import step as step_lib
from loopicl.errors import RunError


class WorkdirLock:
  """One writer per workdir: an exclusive `flock` on `<workdir>/.lock`, held while a run trains.

    with WorkdirLock(workdir):   # RunError (one line) if another live process holds it
      ...

  The lock belongs to the open file, so the kernel drops it when the process ends however it
  ends (kill -9, OOM, a crashed host's NFS lease): no stale lock to clean up, the next launch just
  takes it.  The file stays (never deleted: unlinking a lock file lets two processes lock two
  different files of the same name); while held it names the holder (pid, host, start time) for
  the refusal message, and it is emptied on release.  The descriptor is not inherited by child
  processes.  `enabled=False` (the processes other than 0 of a multi-host run, which write
  nothing) makes it a no-op.  On a filesystem without flock the run goes on unlocked, with a
  warning through `log`.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, log=print):
    self.workdir = workdir
    self.path = os.path.join(workdir, ".lock")
    self.enabled = enabled
    self.log = log
    self._fd = None

  def __enter__(self):
    if not self.enabled:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
      os.close(fd)
      if holder is None:  # e.g. ENOLCK/EOPNOTSUPP: this filesystem cannot lock
        self.log(f"warning: cannot lock workdir {self.workdir} ({e.strerror}); training without "
                 "the one-writer check: do not launch a second run on it")
        return self
      raise RunError(f"workdir {self.workdir} is being trained by {holder}; wait for it, stop it, "
                     "or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.time()}).encode() + b"\n")
    self._fd = fd
    return self

  @staticmethod
  def _holder(fd) -> str:
    """'pid P on host H (since T)' from the lock file; a plainer phrase while it is being written."""
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode())
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
      return f"pid {int(info['pid'])} on host {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
      return "another process"

  def __exit__(self, *exc):
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        os.ftruncate(fd, 0)  # a free workdir's lock file names nobody
      finally:
        os.close(fd)  # closing the only descriptor releases the lock


def prepare_workdir(config, workdir: str, log) -> None:
  """Writes config.json; refuses a run directory written by another release (its config has other
  fields) and a config whose shape fields differ from the stored one."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    release = config_lib.schema_differences(stored, config)
    if release:
      raise RunError(f"workdir {workdir} was written by another release of loopicl (its config.json "
                     f"{', '.join(release)}): continuing it would train another recipe; use a new "
                     "--workdir")
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


def _to_stderr(message: str) -> None:
  print(message, file=sys.stderr)


def load_trained(workdir: str, log=_to_stderr):
  """(config, model, step) of the newest good checkpoint in `workdir`.

  Raises RunError (one line) when there is no config or checkpoint, or when no checkpoint
  matches the config's shapes.  Builds the model only: no training step, so no kernel.  Each
  checkpoint skipped on the way is one `warning:` line through `log` (default: stderr).
  """
  config = load_config(workdir)
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise RunError(f"{workdir}/config.json is invalid: {e}") from None
  family = registry.of(config)
  model_def, state = step_lib.init_state(family, optim.make_optimizer(config.train), config.train.seed)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise RunError(f"{workdir} holds no checkpoint (expected {directory}/<step>/)")
  ckpt = checkpointing.Checkpointer(directory, int(config.checkpoint.keep))
  try:
    step, restored = ckpt.restore_latest(state, log=log, quarantine=False)
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
  config, model, step = load_trained(workdir, log=log)
  family = registry.of(config)
  return family.report(workdir, model, step, loops_max=loops_max, num_prompts=num_prompts,
                       log_tensorboard=log_tensorboard, log=log)


def summary(result: dict, config) -> str:
  """The run's closing lines: what it reached (the family's lines), e.g. next to the GD baseline."""
  lines = [f"== loopicl run: {config.task.kind}, T={config.model.loops} loops, step {result.get('step')}"]
  if "interrupted" in result:
    lines.append(f"   interrupted by {result['interrupted']}; checkpoint saved, rerun to resume")
  lines += registry.of(config).summary_lines(result)
  return "\n".join(lines)
