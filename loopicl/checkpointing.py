"""Orbax checkpoints that are verified on restore.

Orbax does not checksum what it writes: a few overwritten bytes restore silently as garbage, and
an empty or partial step folder is listed as the latest step.  So each checkpoint stores, beside
the train state, a SHA-256 of every array (bytes, shape and dtype, in tree order).  `restore_latest`
walks the steps from the newest, skips any that fails to restore or to verify (with a warning that
names the step, one line through `log`), and moves the bad folders aside into
`<workdir>/checkpoints_corrupt/` so that a later save at the same step can never collide with
them — nothing is deleted.  A failed restore leaves nothing behind either: Orbax's reads of the
other arrays are awaited before its event loop closes (`_pending_reads_awaited`).

Layout: `<directory>/<step>/{state,checksum}` (Orbax's own, one folder per saved step).

Multi-host: every process calls `save` and `restore_latest` with the same arguments (Orbax
synchronises them).  The state goes to Orbax as the jax.Arrays themselves, never as host copies:
Orbax then writes each shard once (replicated arrays from one replica; arrays sharded across hosts
from the host that holds each piece), where a host copy per process would have every process
write, or fail for arrays no single process holds.  The checksum is of the global values, so
each process computes the same one; the small JSON beside it is written by process 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging as std_logging
import os
import shutil
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

try:  # Orbax's event-loop helper, see `_pending_reads_awaited`
  from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio
except ImportError:  # a later Orbax without it: restores work, a failed one may print noise
  _orbax_asyncio = None

from loopicl import distributed


def tree_checksum(tree) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes, in tree-flatten order."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = distributed.host_value(leaf)  # the global value, also for arrays sharded across hosts
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# How long a failed restore waits for Orbax's other reads before closing their event loop.
_PENDING_READS_TIMEOUT_S = 60.0


def _run_sync_awaiting_pending(coro):
  """Orbax's `asyncio_utils._run_sync_via_new_loop`, except that when the coroutine fails, the
  tasks it left running on the loop are awaited before the loop is closed."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    try:
      return loop.run_until_complete(coro)
    except Exception:
      pending = asyncio.all_tasks(loop)
      if pending:
        done, _ = loop.run_until_complete(asyncio.wait(pending, timeout=_PENDING_READS_TIMEOUT_S))
        for task in done:  # retrieved: asyncio would log "Task exception was never retrieved"
          if not task.cancelled():
            task.exception()
      raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


_patch_lock = threading.Lock()


@contextlib.contextmanager
def _pending_reads_awaited():
  """Within this block, a restore that fails leaves no TensorStore read behind it.

  Orbax runs a restore as one coroutine on a fresh event loop (asyncio_utils.run_sync →
  _run_sync_via_new_loop) that reads all arrays at once (asyncio.gather).  When one read fails —
  e.g. a corrupt manifest.ocdbt or array_metadatas file — gather raises at once while the other
  reads are still in flight inside TensorStore, and Orbax closes the loop.  When those reads end,
  TensorStore's threads call loop.call_soon_threadsafe on the closed loop, and each raises
  "RuntimeError: Event loop is closed", printed as a traceback through sys.unraisablehook
  (under pytest: PytestUnraisableExceptionWarning), at a random later moment.  So for the
  duration of a restore, Orbax's helper is replaced by one that waits for those reads first
  (tests/test_workdir.py checks that the helper still exists in the installed Orbax).
  """
  if _orbax_asyncio is None or not hasattr(_orbax_asyncio, "_run_sync_via_new_loop"):
    yield
    return
  with _patch_lock:
    original = _orbax_asyncio._run_sync_via_new_loop
    _orbax_asyncio._run_sync_via_new_loop = _run_sync_awaiting_pending
    try:
      yield
    finally:
      _orbax_asyncio._run_sync_via_new_loop = original


class _DropMissingStepMetadata(std_logging.Filter):
  def filter(self, record):
    return not (record.name == "absl" and
                str(record.msg).startswith("Metadata file does not exist:") and
                record.pathname.replace(os.sep, "/").endswith("orbax/checkpoint/_src/metadata/checkpoint.py"))


@contextlib.contextmanager
def _no_missing_step_metadata_warning():
  """Without Orbax's "Metadata file does not exist: <step>/_CHECKPOINT_METADATA" (absl WARNING).

  Orbax reads every step folder's _CHECKPOINT_METADATA when a manager starts and warns for one
  without it — e.g. an empty step folder.  Such a step is then either restored and verified, or
  skipped by `restore_latest` with its own one warning line; Orbax's line would be a second,
  earlier one for the same checkpoint.  Only that message of that Orbax module is dropped, only
  while a manager starts.  (An unreadable metadata file is still reported: Orbax logs that one
  as an ERROR, and the step's arrays may verify and be used.)
  """
  logger, dropped = std_logging.getLogger("absl"), _DropMissingStepMetadata()
  logger.addFilter(dropped)
  try:
    yield
  finally:
    logger.removeFilter(dropped)


class Checkpointer:
  """A CheckpointManager over `directory` that saves a checksum with every state."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = self._new_manager()

  def _new_manager(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           enable_async_checkpointing=False)
    with _no_missing_step_metadata_warning():
      return ocp.CheckpointManager(self.directory, options=options,
                                   item_names=("state", "checksum"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Saves `state` (a pytree of arrays) at `step`, synchronously, with its checksum.

    On several hosts every process must call this (see the module docstring).
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        checksum=ocp.args.JsonSave({"sha256": tree_checksum(state), "step": int(step),
                                    "time": time.time()})), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, target):
    """The verified state saved at `step` (ValueError or Orbax's error if unusable): a sweep
    whose seeds were saved one after another restores them all at their common step."""
    return self._restore(step, target)

  def _restore(self, step: int, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with _pending_reads_awaited():
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), checksum=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["checksum"]
    if not isinstance(meta, dict) or "sha256" not in meta:
      raise ValueError("no checksum stored")
    if tree_checksum(state) != meta["sha256"]:
      raise ValueError("checksum mismatch (the saved arrays were modified)")
    # Orbax may restore into a different container type; keep the target's tree structure.
    return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(state))

  def restore_latest(self, target, log=print, quarantine: bool = True):
    """(step, state) of the newest checkpoint that restores and verifies; (None, None) if none.

    `target` is a pytree with the expected structure, shapes and dtypes.  Each checkpoint skipped
    is one `warning:` line through `log` (and one more when it is moved aside).  With `quarantine`
    (training, which will save again) unusable step folders are moved aside; readers pass False
    and leave the run directory exactly as they found it.
    """
    bad = []
    found = (None, None)
    for step in reversed(self.all_steps()):
      try:
        found = (step, self._restore(step, target))
        break
      except Exception as e:  # any failure to read means: not a usable checkpoint
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        # One line, through `log` only (no warnings.warn beside it: that printed every skip twice,
        # and on every host of a multi-host run where `log` is process 0's).
        log(f"warning: checkpoint at step {step} is unusable ({reason}); trying an older one")
        bad.append(step)
    if bad and quarantine:
      self._quarantine(bad, log)
    return found

  def _quarantine(self, steps, log):
    """Moves unusable step folders out of Orbax's directory (never deletes them)."""
    self._manager.close()
    target_root = self.directory.rstrip("/") + "_corrupt"
    os.makedirs(target_root, exist_ok=True)
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        dst = os.path.join(target_root, f"{step}.{int(time.time() * 1000)}")
        shutil.move(src, dst)
        log(f"moved unusable checkpoint {step} to {os.path.relpath(dst, os.path.dirname(self.directory))}")
    self._manager = self._new_manager()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
