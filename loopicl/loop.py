"""The training loop of every run: K ≥ 1 seeds of one config in one vmapped program.

A single run (scripts/train.py, `train.train_and_evaluate`) is K = 1 with one run directory; a
sweep point (scripts/sweep.py) trains its K seeds together, each seed writing an ordinary run
directory; the studies train their points' seeds in memory (`sweep.train_seeds`, no directory).
The loop — loop curriculum and chunk plan (schedule.py), programs compiled ahead (step.py),
evaluation, logging, checkpoints, signals, the non-finite policy — is written once, here; where
each seed's files go is the per-seed hook `RunDir`.

Guarantees.  Step s of seed k trains on fold_in(data_key_k, s), and the optimizer state and step
live in each seed's checkpoint, so a resumed run (after kill -9 or SIGTERM) ends bit-identical to
an uninterrupted one; a swept seed is the run `train.py` makes with that seed.  One writer per
run directory (`run.WorkdirLock`).  Non-finite policy: up to `train.nonfinite_skips` non-finite
steps in a row are skipped; the next stops that seed, which stays frozen at its last good state
(no further checkpoint or log) while the other seeds go on; when every seed has stopped, the
loop ends.  SIGTERM/SIGINT: every live seed saves a checkpoint at the end of the current chunk,
then the loop returns with `interrupted` set.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import checkpointing, registry, optim, run as run_lib, runlog, schedule
from loopicl import stats, step as step_lib


class RunDir:
  """The per-seed hook: the run directory one seed writes (workdir lock, config.json, Orbax
  checkpoints, metrics.jsonl, TensorBoard).  `enabled=False` (processes other than 0 of a
  multi-host run) reads checkpoints but writes nothing."""

  def __init__(self, workdir: str, config, *, enabled: bool = True, log=print):
    self.workdir, self.config, self.enabled, self.log = workdir, config, enabled, log

  def __enter__(self):
    with contextlib.ExitStack() as stack:
      stack.enter_context(run_lib.WorkdirLock(self.workdir, enabled=self.enabled, log=self.log))
      if self.enabled:
        run_lib.prepare_workdir(self.config, self.workdir, self.log)
      self.ckpt = checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                             int(self.config.checkpoint.keep))
      stack.callback(self.ckpt.close)
      self.rlog = runlog.RunLog(self.workdir, enabled=self.enabled)
      stack.callback(self.rlog.close)
      self._exit = stack.pop_all()
    return self

  def __exit__(self, *exc):
    return self._exit.__exit__(*exc)

  def begin(self, step: int, family) -> None:
    """Drops log records past `step` (a resumed run rewrites them); the once-per-run records."""
    self.rlog.truncate_after(step)
    if step == 0:
      self.rlog.start_run(self.config, family)

  def save(self, step: int, state) -> None:
    # A seed resumed behind its own newest checkpoint recomputes that step bit for bit (same
    # program, same state): the checkpoint already on disk is that state, kept as it is.
    if step not in self.ckpt.all_steps():
      self.ckpt.save(step, state)

  def last_checkpoint(self):
    steps = self.ckpt.all_steps()
    return steps[-1] if steps else None


def restore(dirs: list[RunDir], states, log) -> tuple[int, object]:
  """(step, states): the seeds' newest common good checkpoint, or (0, states) if a seed has none.

  A sweep killed between two seeds' saves left one seed a checkpoint ahead: it is restored at the
  common step (and keeps its newer checkpoint on disk)."""
  one = [step_lib.unstack(states, k) for k in range(len(dirs))]
  found = [d.ckpt.restore_latest(state, log=log) for d, state in zip(dirs, one)]
  if any(step is None for step, _ in found):
    return 0, states
  step = min(int(s) for s, _ in found)
  restored = [st if int(s) == step else d.ckpt.restore(step, target)
              for (s, st), d, target in zip(found, dirs, one)]
  return step, step_lib.stack(restored)


class Result(NamedTuple):
  """What `train` returns (host numpy arrays; K = len(seeds)).

  step:         the step the loop reached.
  params:       the parameter pure-dict, each leaf [K, ...] (each seed's last good state).
  model_def:    step.ModelDef: model_def.merge(params of one seed) is that seed's model.
  diverged_at:  [K] the step that stopped a seed (non-finite beyond train.nonfinite_skips), −1.
  skipped:      [K] non-finite steps skipped (state unchanged) before any stop.
  loss_curve:   [K, chunks] mean training loss per chunk of this launch.
  evaluations:  [K] the last evaluation of each seed ({} without run directories).
  interrupted:  the signal's name if SIGTERM/SIGINT stopped the loop, else None.
  wall_s:       seconds of this launch (compilation included).
  checkpoints:  [K] each seed's newest checkpoint step on disk (None: none, or no run directory).
  """
  step: int
  params: dict
  model_def: object
  diverged_at: np.ndarray
  skipped: np.ndarray
  loss_curve: np.ndarray
  evaluations: list
  interrupted: str | None
  wall_s: float
  checkpoints: list = []


def seed_config(config, seed: int):
  """`config` with train.seed = `seed` (what that seed's run directory records)."""
  c = config.copy_and_resolve_references()
  c.train.seed = int(seed)
  return c


def train(config, seeds, workdirs: list[str] | None = None, *, log: Callable = print,
          progress: bool = False, is_main: bool = True, log_every_s: float = 30.0) -> Result:
  """Trains (or resumes) `config` once per seed, all seeds in one vmapped program.

  workdirs: one run directory per seed (resumed from its checkpoints), or None to train in
  memory.  `progress`: a progress bar (one seed).  Without run directories a progress line goes
  to `log` at most every `log_every_s` seconds.  config.train.seed is replaced by the seeds.
  """
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds=[] is invalid; allowed: a non-empty list of integers >= 0")
  if workdirs is not None and len(workdirs) != len(seeds):
    raise ValueError(f"{len(workdirs)} workdirs for {len(seeds)} seeds; allowed: one per seed")
  family = registry.of(config, training=True)  # resolves what training needs (the kernel) now
  tx = optim.make_optimizer(config.train)
  model_def, states = step_lib.init_states(family, tx, seeds)
  with contextlib.ExitStack() as stack:
    dirs, start = None, 0
    if workdirs is not None:
      dirs = [stack.enter_context(RunDir(w, seed_config(config, s), enabled=is_main, log=log))
              for w, s in zip(workdirs, seeds)]
      start, states = restore(dirs, states, log)
      if start:
        log(f"resumed from checkpoint at step {start}")
      for d in dirs:
        d.begin(start, family)
      stack.enter_context(stop := run_lib.StopRequest())
    else:
      stop = None
    result = _loop(config, family, tx, model_def, states, start, seeds, dirs, stop, log=log,
                   progress=progress and is_main and len(seeds) == 1, log_every_s=log_every_s)
    if dirs is not None:
      result = result._replace(checkpoints=[d.last_checkpoint() for d in dirs])
    return result


def _loop(config, family, tx, model_def, states, start, seeds, dirs, stop, *, log, progress,
          log_every_s) -> Result:
  K, total, began = len(seeds), int(config.train.steps), time.time()
  t = config.train
  placement = step_lib.Placement.of(K, int(t.batch_size))
  states, bad = placement.place((states, jnp.full((K,), -1, jnp.int32)))
  plan = schedule.chunk_plan(config, events=dirs is not None, start=start)
  programs = step_lib.compile_ahead(plan, lambda loops: step_lib.make_chunk(
      family, model_def, tx, int(t.batch_size), loops, placement), states, bad)
  evaluate = family.make_evaluator() if dirs is not None else None
  learning_rate = optim.learning_rate_schedule(t)
  diverged, skipped = np.full(K, -1, np.int64), np.zeros(K, np.int64)
  curve, last, recent = [], [{} for _ in seeds], [{} for _ in seeds]
  bar = runlog.ProgressBar(total, start=start, enabled=progress)
  step, interrupted, last_log = start, None, began
  t_last, steps_since = time.time(), 0
  try:
    for first, length, loops in plan:
      states, bad, metrics = programs[(loops, length)].result()(states, bad, jnp.int32(first))
      metrics = {k: np.asarray(v) for k, v in metrics.items()}              # [K, length]
      step, steps_since = first + length, steps_since + length
      curve.append(stats.finite_mean(metrics["loss"].astype(np.float64))[0])
      skipped += metrics["skipped"].sum(axis=1).astype(np.int64)
      for k in np.flatnonzero((np.asarray(bad) >= 0) & (diverged < 0)):
        diverged[k] = int(np.asarray(bad)[k])
        if K > 1:
          log(f"  seed {seeds[k]}: non-finite loss or gradient at step {diverged[k]}; frozen at "
              "its last good state (the other seeds go on)")
      alive = np.flatnonzero(diverged < 0)
      if alive.size == 0:
        break
      steps_per_s = steps_since / max(time.time() - t_last, 1e-9)
      if dirs is not None:
        _events(config, family, model_def, states, metrics, step, loops, alive, dirs, evaluate,
                last, recent, learning_rate=float(learning_rate(step)), steps_per_s=steps_per_s)
        bar.update(step, float(metrics["loss"][0, -1]), steps_per_s)
        if schedule.is_event(step, t.log_every, total):
          t_last, steps_since = time.time(), 0
        if stop.signal is not None and step < total:
          for k in alive:
            dirs[k].save(step, step_lib.unstack(states, k))
          log(f"\n{stop.signal}: saved a checkpoint at step {step}; rerun the same command to resume")
          interrupted = stop.signal
          break
      elif time.time() - last_log > log_every_s:
        last_log = time.time()
        finite = curve[-1][np.isfinite(curve[-1])]  # no "All-NaN slice" warning once all diverged
        median = f"{np.median(finite):.3e}" if finite.size else "nan"
        log(f"  step {step}/{total} (T={loops}): loss {median} median over seeds, "
            f"{alive.size}/{K} alive, {last_log - began:.0f} s")
  finally:
    bar.close()
    for future in programs.values():  # an interrupted run does not wait for unneeded compiles
      future.cancel()
  params = jax.device_get(states["params"])
  if dirs is not None and not plan:  # launched again after the last step: evaluate, write nothing
    last = [evaluate(model_def.merge(step_lib.unstack(params, k))) for k in range(K)]
  curve = np.stack(curve, axis=1) if curve else np.zeros((K, 0))
  return Result(step=step, params=params, model_def=model_def, diverged_at=diverged,
                skipped=skipped, loss_curve=curve, evaluations=last, interrupted=interrupted,
                wall_s=time.time() - began)


def _events(config, family, model_def, states, metrics, step, loops, alive, dirs, evaluate,
            last, recent, *, learning_rate, steps_per_s) -> None:
  """What the live seeds write after a chunk: train scalars, evaluation, checkpoint."""
  t, total = config.train, int(config.train.steps)
  params = None
  for k in alive:
    mine = {name: v[k] for name, v in metrics.items()}
    recent[k] = {n: v[-int(t.steps_per_call):] for n, v in mine.items() if n != "grad_norm"}
    if schedule.is_event(step, t.log_every, total):
      dirs[k].rlog.train_chunk(step, mine, learning_rate=learning_rate, steps_per_s=steps_per_s,
                               loops=loops)
    if schedule.is_event(step, config.eval.every, total):
      params = jax.device_get(states["params"]) if params is None else params
      model = model_def.merge(step_lib.unstack(params, k))
      last[k] = dirs[k].rlog.evaluation(step, evaluate(model), recent[k])
      family.log_extras(dirs[k].rlog, step, model, last[k])
      dirs[k].rlog.flush()
    if schedule.is_event(step, config.checkpoint.every, total):
      dirs[k].save(step, step_lib.unstack(states, k))
