"""The run directory's guarantees: one writer per workdir, and a clean fallback past a bad checkpoint.

One writer: `run.WorkdirLock` (an flock on <workdir>/.lock, taken by `train.train_and_evaluate` on
process 0 before it writes anything) makes a second launch on a workdir that a live process is
training fail with one line, and leaves nothing stale behind a process killed with SIGKILL.
Clean fallback: an unusable checkpoint is one `warning:` line (and one `moved` line), with no
traceback from Orbax's reads left in flight by the failed restore.
"""
import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from loopicl import checkpointing, run, train
from loopicl.errors import RunError
from tests.test_train import DEFAULT_CONFIG, ROOT, tiny_config

HOLD = """
import sys, time
from loopicl import run
with run.WorkdirLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


@contextlib.contextmanager
def _held_by_child(workdir):
  """A child process that holds `workdir`'s lock until the block ends (or it is killed)."""
  child = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert child.stdout.readline().strip() == "locked"
    yield child
  finally:
    child.kill()
    child.wait()
    child.stdout.close()


def _train(config, workdir, log=lambda *a: None):
  return train.train_and_evaluate(config, str(workdir), log=log, progress=False)


def test_second_launch_on_a_locked_workdir_refuses_and_writes_nothing(tmp_path):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  stored = json.dumps(tiny_config(**{"train.steps": 20}).to_dict())  # differs: would be backed up
  (workdir / "config.json").write_text(stored)
  with _held_by_child(workdir) as child:
    with pytest.raises(RunError) as e:
      _train(tiny_config(), workdir)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"workdir {workdir} is being trained by pid {child.pid} on host ")
  assert message.endswith("wait for it, stop it, or use another --workdir")
  assert sorted(os.listdir(workdir)) == [".lock", "config.json"]  # no metrics, no backup, no events
  assert (workdir / "config.json").read_text() == stored


def test_killed_holder_leaves_no_stale_lock_and_readers_take_none(tmp_path):
  workdir = tmp_path / "killed"
  with _held_by_child(workdir) as child:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
  assert json.loads((workdir / ".lock").read_text())["pid"] == child.pid  # names a dead process
  config = tiny_config(**{"train.steps": 20})
  assert _train(config, workdir)["step"] == 20
  assert (workdir / ".lock").read_text() == ""  # released and emptied when the run ended
  with _held_by_child(workdir):
    assert run.load_trained(str(workdir))[2] == 20  # reading a run being trained is allowed


def test_lock_is_exclusive_within_one_process_too(tmp_path):
  with run.WorkdirLock(str(tmp_path)):
    with pytest.raises(RunError, match=f"pid {os.getpid()} on host"):
      with run.WorkdirLock(str(tmp_path)):
        pass
  with run.WorkdirLock(str(tmp_path)), run.WorkdirLock(str(tmp_path), enabled=False):
    pass  # released by the first block; a disabled lock (processes other than 0) takes nothing


def test_filesystem_without_flock_warns_once_and_trains_unlocked(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(run.fcntl, "flock", no_flock)
  lines = []
  with run.WorkdirLock(str(tmp_path), log=lines.append):
    pass
  assert len(lines) == 1 and lines[0].startswith(f"warning: cannot lock workdir {tmp_path} (")


def test_cli_on_a_locked_workdir_exits_1_with_one_error_line(tmp_path):
  workdir = tmp_path / "cli"
  with _held_by_child(workdir):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={DEFAULT_CONFIG}",
         f"--workdir={workdir}", "--config.train.steps=20", "--noprogress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr
  assert proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"error: workdir {workdir} is being trained by pid ")
  assert sorted(os.listdir(workdir)) == [".lock"]


# -- a failed restore leaves nothing in flight ----------------------------------------------------

def test_failed_restore_awaits_the_reads_it_left_in_flight():
  """The mechanism, deterministically: when one coroutine of a gather fails, Orbax's run_sync
  (within `_pending_reads_awaited`) returns only after the others ended — here a read that
  completes on another thread, as TensorStore's do, and would find the loop closed."""
  from orbax.checkpoint._src import asyncio_utils
  original = asyncio_utils._run_sync_via_new_loop  # the Orbax helper the fix wraps must exist
  finished = threading.Event()

  async def slow_read():
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.3)
    finished.set()

  async def failing_read():
    raise ValueError("corrupt")

  async def restore():
    await asyncio.gather(slow_read(), failing_read())

  with checkpointing._pending_reads_awaited():
    with pytest.raises(ValueError, match="corrupt"):
      asyncio_utils.run_sync(restore())
  assert finished.is_set()
  assert asyncio_utils._run_sync_via_new_loop is original  # put back after the restore


def test_unusable_checkpoints_are_one_line_each_and_no_traceback(tmp_path, monkeypatch, caplog):
  caught = []
  monkeypatch.setattr(sys, "unraisablehook", caught.append)
  directory = str(tmp_path / "checkpoints")
  state = {f"w{i:03d}": np.full((4, 4), float(i), np.float32) for i in range(128)}  # many reads
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  ckpt.save(1, state)
  ckpt.save(2, state)
  ckpt.close()
  manifest = os.path.join(directory, "2", "state", "manifest.ocdbt")  # every array read fails
  data = bytearray(open(manifest, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
  open(manifest, "wb").write(bytes(data))
  os.makedirs(os.path.join(directory, "3"))  # an empty step folder: Orbax warns of it on its own
  lines = []
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  try:
    step, restored = ckpt.restore_latest(state, log=lines.append)
  finally:
    ckpt.close()
  time.sleep(0.5)  # reads left in flight would report within this
  assert step == 1 and np.array_equal(restored["w007"], state["w007"])
  assert len(lines) == 4, lines  # one line per unusable checkpoint, one per folder moved aside
  assert lines[0].startswith("warning: checkpoint at step 3 is unusable (")
  assert lines[1].startswith("warning: checkpoint at step 2 is unusable (")
  assert lines[2].startswith("moved unusable checkpoint 3 to checkpoints_corrupt/3.")
  assert lines[3].startswith("moved unusable checkpoint 2 to checkpoints_corrupt/2.")
  assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
  assert caught == []
