"""The training job: learn a looped transformer from tasks sampled on the fly.

Read top to bottom: optimizer → the jitted chunk of steps (a pure function of (state, step)) →
`train_and_evaluate` (restore, loop with periodic evaluation / logging / checkpointing) →
`load_trained` for tools that read a finished run.

Determinism: step s trains on the batch drawn from fold_in(data_key, s), and the optimizer state
and step live in the checkpoint, so a resumed run continues exactly where it stopped and ends
bit-identical to an uninterrupted one.  Steps are grouped into chunks of `train.steps_per_call`
(one `lax.scan`, one dispatch), aligned to multiples of steps_per_call and cut at every event
(evaluation, checkpoint, curriculum change), so a resumed run groups its steps the same way.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from loopicl import checkpointing, config as config_lib, objectives, runlog


class RunError(RuntimeError):
  """A run cannot go on; the message is one line meant for the user."""


# -- optimizer ------------------------------------------------------------------------------------

def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then constant or cosine decay to 0."""
  t = train_config
  warmup = min(int(t.warmup_steps), int(t.steps))
  if t.schedule == "constant":
    after = optax.constant_schedule(t.learning_rate)
  else:
    after = optax.cosine_decay_schedule(t.learning_rate, max(int(t.steps) - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup), after], [warmup])


def construction_phase(steps: int, d: int) -> optax.GradientTransformation:
  """For the first `steps` updates, zero every update of P and Q outside the GD construction's
  blocks (P_yy = P[d:, d:] and Q_xx = Q[:d, :d]; other leaves, e.g. the `gd` A, pass).

  Why: started at (or near) the construction, the `full` model first learns the best
  preconditioned GD *within* the construction — a linear-in-the-data loop that cannot blow up —
  and only then may use the other blocks, which at large T otherwise grow early (P_xx makes the
  x-rows change from loop to loop, a degree-3^T polynomial) and blow up rare prompts.  Masking
  the updates (after Adam), not the gradients, keeps Adam's moments of the frozen entries warm,
  so they do not jump when released.
  """
  def masks(updates):
    def mask(path, u):
      name = getattr(path[-1], "key", None)
      if name == "P":
        return jnp.zeros(u.shape, u.dtype).at[d:, d:].set(1)
      if name == "Q":
        return jnp.zeros(u.shape, u.dtype).at[:d, :d].set(1)
      return jnp.ones(u.shape, u.dtype)
    return jax.tree_util.tree_map_with_path(mask, updates)

  def init_fn(params):
    del params
    return {"count": jnp.zeros([], jnp.int32)}

  def update_fn(updates, state, params=None):
    del params
    frozen = state["count"] < steps
    updates = jax.tree.map(lambda u, m: jnp.where(frozen, u * m, u), updates, masks(updates))
    return updates, {"count": state["count"] + 1}

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(train_config, d: int | None = None) -> optax.GradientTransformation:
  """clip → Adam/AdamW/SGD with the schedule (→ the construction phase when
  `train.construction_steps` > 0, which needs the task's input dimension `d`)."""
  t = train_config
  schedule = learning_rate_schedule(t)
  # Clipping is always in the chain (inf when off) so the optimizer state has one structure.
  clip = optax.clip_by_global_norm(t.grad_clip if t.grad_clip > 0 else float("inf"))
  if t.optimizer == "adam":
    opt = optax.adam(schedule)
  elif t.optimizer == "adamw":
    opt = optax.adamw(schedule, weight_decay=t.weight_decay)
  else:
    opt = optax.sgd(schedule, momentum=float(t.momentum))
  construction_steps = int(t.get("construction_steps", 0))
  if construction_steps <= 0:  # off: the optimizer state keeps its older structure
    return optax.chain(clip, opt)
  if d is None:
    raise ValueError("train.construction_steps > 0 needs make_optimizer(..., d=config.task.d)")
  return optax.chain(clip, opt, construction_phase(construction_steps, int(d)))


def loops_at(config, step: int) -> int:
  """Loops trained at `step`: the loop curriculum grows from curriculum_start to model.loops."""
  t, T = config.train, int(config.model.loops)
  if t.curriculum_start <= 0:
    return T
  return min(T, int(t.curriculum_start) + (step // int(t.curriculum_every)) * int(t.curriculum_increment))


# -- the jitted chunk of steps --------------------------------------------------------------------

def make_train_step(objective, graphdef, tx, batch_size: int, loops: int):
  """The pure step (state, step) -> (state, metrics): sample, loss, gradient, optax update.

  state = {"params", "opt_state", "data_key"} (pytrees of arrays).  Step s draws its batch from
  fold_in(data_key, s) on device, so the data is a function of the step alone.
  """
  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    return objective.loss(model, batch, loops)

  def step_fn(state, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["data_key"]), step)
    batch = objective.sample(key, batch_size)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "data_key": state["data_key"]}
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  return step_fn


def scan_steps(step_fn, state, first_step, length: int, bad=None):
  """Runs `length` steps from `first_step` in one lax.scan: (state, first_bad_step, metrics).

  A step whose loss or gradient is not finite leaves the state unchanged, and so do all later
  steps of the scan; first_bad_step is that step (−1 if none), so the host can stop cleanly
  with the last good state.  `bad` carries the flag in from earlier scans (a sweep keeps a
  diverged seed frozen across chunks); None means −1.
  """
  def body(carry, step):
    state, bad = carry
    new_state, metrics = step_fn(state, step)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & (bad < 0)
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    bad = jnp.where((bad < 0) & ~ok, step, bad)
    return (state, bad), metrics

  steps = first_step + jnp.arange(length, dtype=jnp.int32)
  bad = jnp.int32(-1) if bad is None else bad
  (state, bad), metrics = jax.lax.scan(body, (state, bad), steps)
  return state, bad, metrics


def make_train_chunk(objective, graphdef, tx, batch_size: int, loops: int):
  """(state, first_step, length) -> (state, first_bad_step, metrics), jitted; state is donated.

  With several devices the batch is split over them and the state stays replicated
  (distributed.py); the call returns once the chunk is computed, so one sharded program is in
  flight at a time (XLA's CPU collectives abort when several wait on each other).  Raises
  config.ConfigError (one line) when batch_size does not split evenly over the devices.
  """
  from loopicl import distributed
  mesh = distributed.data_mesh(batch_size)
  if mesh is not None:
    objective = distributed.ShardedObjective(objective, mesh)
  step_fn = make_train_step(objective, graphdef, tx, batch_size, loops)
  # Everything the chunk returns is replicated: params and metrics read the same on every host.
  out_shardings = None if mesh is None else distributed.replicated(mesh)

  @functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,), out_shardings=out_shardings)
  def jitted(state, first_step, length):
    return scan_steps(step_fn, state, first_step, length)

  def chunk(state, first_step, length):
    return distributed.block(jitted(state, first_step, length))

  chunk.jitted = jitted  # for lower()/compile(): cost and memory analysis (benchmark.py)
  return chunk


def _next_event(step: int, config, total: int) -> int:
  """The first step after `step` at which the host must act (chunk boundary or event)."""
  t = config.train
  candidates = [total, (step // t.steps_per_call + 1) * t.steps_per_call,
                (step // config.eval.every + 1) * config.eval.every,
                (step // config.checkpoint.every + 1) * config.checkpoint.every,
                (step // t.log_every + 1) * t.log_every]
  if t.curriculum_start > 0:
    candidates.append((step // t.curriculum_every + 1) * t.curriculum_every)
  return min(c for c in candidates if c > step)


# -- the run --------------------------------------------------------------------------------------

def _init_state(objective, config, tx):
  key = jax.random.key(int(config.train.seed))
  model = objective.create_model(nnx.Rngs(params=jax.random.fold_in(key, 0)))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  state = {"params": params, "opt_state": tx.init(params),
           "data_key": jax.random.key_data(jax.random.fold_in(key, 1))}
  return graphdef, state


def _prepare_workdir(config, workdir: str, log) -> None:
  """Writes config.json; refuses a config whose shape fields differ from the stored one."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    changed = config_lib.shape_field_differences(stored, config)
    if changed:
      fields = ", ".join(f"{f} (stored {config_lib._get(ml_collections.ConfigDict(stored), f)!r}, "
                         f"now {config_lib._get(config, f)!r})" for f in changed)
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


class _StopRequest:
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, log=print,
                       progress: bool = True) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics.

  The returned dict holds the last evaluation's metrics plus `step`, and `interrupted` (the
  signal's name) if SIGTERM/SIGINT stopped the run after saving a checkpoint.  Raises
  config_lib.ConfigError for a bad config (before any work) and RunError when the run cannot go
  on (non-finite loss, incompatible workdir); both carry one-line messages.
  """
  config_lib.validate(config)
  from loopicl import distributed
  distributed.maybe_initialize(config)
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *a, **k: None)
  if is_main:
    _prepare_workdir(config, workdir, log)

  objective = objectives.make_objective(config)
  tx = make_optimizer(config.train, d=config.task.get("d"))
  graphdef, state = _init_state(objective, config, tx)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), int(config.checkpoint.keep))
  restored_step, restored = ckpt.restore_latest(state, log=log)
  step = 0
  if restored is not None:
    state, step = restored, int(restored_step)
    log(f"resumed from checkpoint at step {step}")
  rlog = runlog.RunLog(workdir, enabled=is_main)
  rlog.truncate_after(step)
  if step == 0:
    rlog.text(0, "config", "```\n" + json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n```")
  state = distributed.place_state(state)  # replicated over the devices (identity on one)

  total = int(config.train.steps)
  evaluate = objective.make_evaluator()
  chunks = {}  # (loops, batch) -> jitted chunk; each length compiles once
  bar = runlog.ProgressBar(total, start=step, enabled=progress and is_main)
  last = {"step": step}
  recent_losses = []
  t_last, steps_since = time.time(), 0

  def do_eval(step):
    model = nnx.merge(graphdef, jax.device_get(state["params"]))
    metrics = evaluate(model)
    metrics["step"] = step
    metrics["train_loss"] = float(np.mean(recent_losses)) if recent_losses else float("nan")
    rlog.write_metrics(metrics)
    rlog.scalars(step, {k: v for k, v in metrics.items() if k != "step"}, prefix="eval/")
    for t, err in enumerate(metrics.get("test_error_per_loop", []), start=1):
      rlog.scalars(step, {f"test_error_loop_{t:02d}": err}, prefix="eval/per_loop/")
    if hasattr(objective, "reference_weights"):
      P, Q = (np.asarray(w) for w in model.weights())
      P_ref, Q_ref = objective.reference_weights(model)
      rlog.figure(step, "weights/P_Q_vs_construction", runlog.weight_heatmaps(
          P, Q, P_ref, Q_ref, title=f"step {step}: weight distance {metrics['weight_distance']:.3f}"))
    rlog.flush()
    return metrics

  stop = _StopRequest()
  with stop:
    try:
      while step < total:
        loops = loops_at(config, step)
        end = _next_event(step, config, total)
        chunk = chunks.get(loops)
        if chunk is None:
          chunk = chunks[loops] = make_train_chunk(objective, graphdef, tx,
                                                   int(config.train.batch_size), loops)
        state, bad, metrics = chunk(state, jnp.int32(step), end - step)
        bad = int(bad)
        if bad >= 0:
          good = ckpt.all_steps()
          raise RunError(f"non-finite loss or gradient at step {bad}; stopped without saving. "
                         f"Last good checkpoint: step {good[-1] if good else 'none'} (kept)")
        losses = np.asarray(metrics["loss"])
        recent_losses = list(losses[-int(config.train.steps_per_call):])
        steps_since += end - step
        step = end
        now = time.time()
        steps_per_s = steps_since / max(now - t_last, 1e-9)
        if step % config.train.log_every == 0 or step == total:
          rlog.scalars(step, {"loss": float(losses.mean()),
                              "grad_norm": float(np.asarray(metrics["grad_norm"]).mean()),
                              "learning_rate": float(learning_rate_schedule(config.train)(step)),
                              "steps_per_s": steps_per_s, "loops": loops}, prefix="train/")
          t_last, steps_since = now, 0
        bar.update(step, float(losses[-1]), steps_per_s)
        if step % config.eval.every == 0 or step == total:
          last = do_eval(step)
        if step % config.checkpoint.every == 0 or step == total:
          ckpt.save(step, state)
        if stop.signal is not None and step < total:
          if step not in ckpt.all_steps():
            ckpt.save(step, state)
          log(f"\n{stop.signal}: saved a checkpoint at step {step}; rerun the same command to resume")
          last = dict(last, step=step, interrupted=stop.signal)
          break
    finally:
      bar.close()
      ckpt.close()
      rlog.close()
  if last.get("step") != step:
    # Launched again after the last step: nothing to train; evaluate without writing anything.
    last = dict(do_eval_readonly(objective, graphdef, state), step=step)
  return last


def do_eval_readonly(objective, graphdef, state) -> dict:
  """Evaluates a state without writing anything (a finished run that is launched again)."""
  model = nnx.merge(graphdef, jax.device_get(state["params"]))
  return objective.make_evaluator()(model)


# -- reading a finished run -----------------------------------------------------------------------

def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{workdir} holds no config.json: not a loopicl run directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str):
  """(config, model, step) of the newest good checkpoint in `workdir`.

  Raises RunError (one line) when there is no config or checkpoint, or when no checkpoint
  matches the config's shapes.
  """
  config = load_config(workdir)
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise RunError(f"{workdir}/config.json is invalid: {e}") from None
  objective = objectives.make_objective(config)
  tx = make_optimizer(config.train, d=config.task.get("d"))
  graphdef, state = _init_state(objective, config, tx)
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
  return config, nnx.merge(graphdef, restored["params"]), int(step)


def summary(result: dict, config) -> str:
  """The run's closing lines: what it reached, next to the GD baseline."""
  lines = [f"== loopicl run: {config.task.kind}, T={config.model.loops} loops, step {result.get('step')}"]
  if "interrupted" in result:
    lines.append(f"   interrupted by {result['interrupted']}; checkpoint saved, rerun to resume")
  if "test_error" in result and "gd_error" in result:
    verdict = "at or below" if result["gd_ratio"] <= 1.1 else "above"
    lines.append(f"   test error after T loops      {result['test_error']:.4e}")
    lines.append(f"   best constant-step GD error   {result['gd_error']:.4e} (eta={result['gd_step_size']:.4g})")
    lines.append(f"   ratio model/GD                {result['gd_ratio']:.3f}  ({verdict} GD within 10%)")
    lines.append(f"   weight distance to GD line    {result['weight_distance']:.3f}")
    if result.get("nonfinite_prompts"):
      lines.append(f"   non-finite prompts            {result['nonfinite_prompts']}")
  for key in ("test_zero_one", "test_cross_entropy", "correct_attention"):
    if key in result:
      lines.append(f"   {key:<30s}{result[key]:.4g}")
  return "\n".join(lines)
