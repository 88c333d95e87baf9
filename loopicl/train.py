"""The training job: learn a model of any task family from tasks sampled on the fly.

Read top to bottom: optimizer → the jitted chunk of steps (a pure function of (state, step)) →
the chunk plan → `init_state` → `train_and_evaluate` (restore, loop with periodic evaluation /
logging / checkpointing).  The family (family.py) supplies the model, the sampler, the loss, the
evaluator and which variables are trainable; nothing here knows a task kind.

Determinism: step s trains on the batch drawn from fold_in(data_key, s), and the optimizer state
and step live in the checkpoint, so a resumed run continues exactly where it stopped and ends
bit-identical to an uninterrupted one.  Steps are grouped into chunks of `train.steps_per_call`
(one `lax.scan`, one dispatch), aligned to multiples of steps_per_call and cut at every event
(evaluation, checkpoint, logging, curriculum change), so a resumed run groups its steps the same
way.

Trainable variables: the model is split with the family's `trainable` filter; only those
variables are in `state["params"]`, differentiated and updated.  The others (e.g. a fixed output
layer) are constants of the step, rebuilt by `create_model` from the seed, never trained.
"""
from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from loopicl import checkpointing, config as config_lib, family as family_lib, run as run_lib, runlog, soap
from loopicl.errors import RunError

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


def global_norm(tree) -> jax.Array:
  """‖tree‖₂ that does not overflow: optax.tree.norm where that is finite (bit for bit), else the
  norm scaled by the largest |entry| first.

  Why: a prompt the loop blows up gives float32 gradients of ~1e19 — finite, and clipped to an
  ordinary step — but their plain sum of squares is inf, which turned a recoverable step into a
  divergence (the step is rejected as non-finite).
  """
  plain = optax.tree.norm(tree)
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return plain
  scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
  safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  scaled = safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))
  return jnp.where(jnp.isfinite(plain), plain, scaled.astype(plain.dtype))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (the same arithmetic and empty state) on the overflow-free
  `global_norm`."""
  def update_fn(updates, params=None):
    del params
    norm = global_norm(updates)
    trigger = norm < max_norm
    return jax.tree.map(
        lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), updates)
  return optax.stateless(update_fn)


def make_optimizer(train_config, extra: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
  """clip → Adam/AdamW/SGD/SOAP with the schedule (→ the family's `optimizer_extra()`, if any)."""
  t = train_config
  schedule = learning_rate_schedule(t)
  # Clipping is always in the chain (inf when off) so the optimizer state has one structure.
  clip = clip_by_global_norm(t.grad_clip if t.grad_clip > 0 else float("inf"))
  eps, b2 = float(t.get("adam_eps", 1e-8)), float(t.get("adam_b2", 0.999))
  if t.optimizer == "adam":
    opt = optax.adam(schedule, b2=b2, eps=eps)
  elif t.optimizer == "adamw":
    opt = optax.adamw(schedule, b2=b2, eps=eps, weight_decay=t.weight_decay)
  elif t.optimizer == "soap":
    opt = soap.soap(schedule, b2=b2, eps=eps, shampoo_decay=float(t.get("shampoo_decay", 0.99)),
                    precondition_every=int(t.get("precondition_every", 10)))
    if extra is not None:
      # SOAP's factors GGᵀ, GᵀG mix a matrix's entries: a frozen block's gradient would steer
      # the basis of the learned ones, so the family's mask also acts on the gradient first.
      opt = optax.chain(extra, opt)
  else:
    opt = optax.sgd(schedule, momentum=float(t.momentum))
  if extra is None:  # the optimizer state keeps its older structure
    if int(t.get("construction_steps", 0)) != 0:  # asked for, but it would be silently dropped
      raise ValueError("train.construction_steps != 0 needs the family's optimizer_extra(); "
                       "allowed: train.family_optimizer(family)")
    return optax.chain(clip, opt)
  return optax.chain(clip, opt, extra)


def family_optimizer(family) -> optax.GradientTransformation:
  """The optimizer a run of `family` trains with."""
  return make_optimizer(family.config.train, family.optimizer_extra())


# -- the jitted chunk of steps --------------------------------------------------------------------

class ModelDef(NamedTuple):
  """What turns trainable parameters back into the model: the graph and the frozen variables."""
  graphdef: object
  frozen: nnx.State

  def merge(self, params):
    return nnx.merge(self.graphdef, params, self.frozen)


def make_train_step(family, model_def: ModelDef, tx, batch_size: int, loops: int):
  """The pure step (state, step) -> (state, metrics): sample, loss, gradient, optax update.

  state = {"params", "opt_state", "data_key"} (pytrees of arrays; params = the trainable
  variables only).  Step s draws its batch from fold_in(data_key, s) on device, so the data is a
  function of the step alone.  metrics: loss, grad_norm and the family's aux scalars.
  """
  loss_of = family.make_loss()  # the family resolves what it must (the linear kernel) here

  def loss_fn(params, batch):
    return loss_of(model_def.merge(params), batch, loops)

  def step_fn(state, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["data_key"]), step)
    batch = family.sample(key, batch_size)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "data_key": state["data_key"]}
    return new_state, {"loss": loss, "grad_norm": global_norm(grads), **aux}

  return step_fn


def scan_steps(step_fn, state, first_step, length: int, bad=None, max_skips: int = 0):
  """Runs `length` steps from `first_step` in one lax.scan: (state, first_bad_step, metrics).

  A step whose loss or gradient is not finite leaves the state unchanged.  Up to `max_skips` such steps in a row (`train.nonfinite_skips`) are skipped and
  training goes on with the next batch (metrics["skipped"] = 1); the one after that marks the run bad: it and all later
  steps of the scan leave the state unchanged and first_bad_step is that step (−1 if none), so
  the host can stop cleanly with the last good state.  `bad` carries the flag in from earlier
  scans (a sweep keeps a diverged seed frozen across chunks); None means −1.  The streak
  restarts at each scan (a chunk of `train.steps_per_call` steps or fewer).
  """
  def body(carry, step):
    state, bad, streak = carry
    new_state, metrics = step_fn(state, step)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    alive = bad < 0
    streak = jnp.where(finite, 0, streak + 1)
    stop = alive & (streak > max_skips)
    ok = finite & alive
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    bad = jnp.where(stop, step, bad)
    # skipped: a non-finite step the run survives (not the one that stops it, nor a stopped run's)
    metrics = dict(metrics, skipped=(alive & ~finite & ~stop).astype(jnp.float32))
    return (state, bad, streak), metrics

  steps = first_step + jnp.arange(length, dtype=jnp.int32)
  bad = jnp.int32(-1) if bad is None else bad
  (state, bad, _), metrics = jax.lax.scan(body, (state, bad, jnp.int32(0)), steps)
  return state, bad, metrics


def make_train_chunk(family, model_def: ModelDef, tx, batch_size: int, loops: int):
  """(state, first_step, length) -> (state, first_bad_step, metrics), jitted; state is donated.

  With several devices the batch is split over them and the state stays replicated
  (distributed.py); the call returns once the chunk is computed, so one sharded program is in
  flight at a time (XLA's CPU collectives abort when several wait on each other).  Raises
  errors.ConfigError (one line) when batch_size does not split evenly over the devices.
  """
  from loopicl import distributed
  mesh = distributed.data_mesh(batch_size)
  if mesh is not None:
    family = distributed.ShardedFamily(family, mesh)
  step_fn = make_train_step(family, model_def, tx, batch_size, loops)
  # Everything the chunk returns is replicated: params and metrics read the same on every host.
  out_shardings = None if mesh is None else distributed.replicated(mesh)

  @functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,), out_shardings=out_shardings)
  def jitted(state, first_step, length):
    return scan_steps(step_fn, state, first_step, length,
                      max_skips=int(family.config.train.get("nonfinite_skips", 0)))

  def chunk(state, first_step, length):
    return distributed.block(jitted(state, first_step, length))

  chunk.jitted = jitted  # for lower()/compile(): cost and memory analysis (benchmark.py)
  return chunk


def loops_at(config, step: int) -> int:
  """Loops trained at `step`: the loop curriculum grows from curriculum_start to model.loops."""
  t, T = config.train, int(config.model.loops)
  if t.curriculum_start <= 0:
    return T
  return min(T, int(t.curriculum_start) + (step // int(t.curriculum_every)) * int(t.curriculum_increment))


def next_boundary(config, step: int, total: int, events: bool = True) -> int:
  """The first step after `step` at which a chunk must end: a multiple of steps_per_call, a
  curriculum change, the end and (with `events`) an evaluation, checkpoint or log step."""
  t = config.train
  every = [int(t.steps_per_call)]
  if t.curriculum_start > 0:
    every.append(int(t.curriculum_every))
  if events:
    every += [int(config.eval.every), int(config.checkpoint.every), int(t.log_every)]
  return min([total] + [(step // e + 1) * e for e in every])


def chunk_plan(config, events: bool = False) -> list[tuple[int, int, int]]:
  """[(first_step, length, loops)]: the chunks of a whole run (`next_boundary`).  Sweeps use it
  without the event cuts — chunking changes only the dispatch count, never the numbers."""
  total, out, step = int(config.train.steps), [], 0
  while step < total:
    end = next_boundary(config, step, total, events)
    out.append((step, end - step, loops_at(config, step)))
    step = end
  return out


def init_state(family, tx, seed: int):
  """(model_def, state) of a run with train.seed = `seed`: parameters from fold_in(key(seed), 0),
  data key fold_in(key(seed), 1).  Only the family's trainable variables are in the state."""
  key = jax.random.key(int(seed))
  model = family.create_model(nnx.Rngs(params=jax.random.fold_in(key, 0)))
  graphdef, trainable, frozen = nnx.split(model, family.trainable, ...)
  params = nnx.to_pure_dict(trainable)
  state = {"params": params, "opt_state": tx.init(params),
           "data_key": jax.random.key_data(jax.random.fold_in(key, 1))}
  return ModelDef(graphdef, frozen), state


# -- the run --------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, log=print,
                       progress: bool = True) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics.

  The returned dict holds the last evaluation's metrics plus `step`, and `interrupted` (the
  signal's name) if SIGTERM/SIGINT stopped the run after saving a checkpoint.  Raises
  errors.ConfigError for a bad config (before any work) and RunError when the run cannot go
  on (non-finite loss, incompatible workdir); both carry one-line messages.
  """
  config_lib.validate(config)
  from loopicl import distributed
  distributed.maybe_initialize(config)
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *a, **k: None)
  # One writer per workdir: process 0 (the only one that writes) locks it before writing anything
  # and holds the lock until the run ends; a second launch gets a one-line RunError.
  with run_lib.WorkdirLock(workdir, enabled=is_main, log=log):
    return _train_locked(config, workdir, log=log, progress=progress, is_main=is_main)


def _train_locked(config, workdir: str, *, log, progress: bool, is_main: bool) -> dict:
  """`train_and_evaluate` once process 0 holds the workdir's lock."""
  from loopicl import distributed
  if is_main:
    run_lib.prepare_workdir(config, workdir, log)

  family = family_lib.of(config)
  tx = family_optimizer(family)
  model_def, state = init_state(family, tx, config.train.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), int(config.checkpoint.keep))
  restored_step, restored = ckpt.restore_latest(state, log=log)
  step = 0
  if restored is not None:
    state, step = restored, int(restored_step)
    log(f"resumed from checkpoint at step {step}")
  rlog = runlog.RunLog(workdir, enabled=is_main)
  rlog.truncate_after(step)
  if step == 0:
    rlog.start_run(config, family)
  state = distributed.place_state(state)  # replicated over the devices (identity on one)

  total = int(config.train.steps)
  evaluate = family.make_evaluator()
  chunks = {}  # loops -> jitted chunk; each length compiles once
  bar = runlog.ProgressBar(total, start=step, enabled=progress and is_main)
  last = {"step": step}
  recent = {}
  t_last, steps_since = time.time(), 0

  def do_eval(step):
    model = model_def.merge(jax.device_get(state["params"]))
    metrics = rlog.evaluation(step, evaluate(model), recent)  # + the last chunk's train metrics
    family.log_extras(rlog, step, model, metrics)
    rlog.flush()
    return metrics

  stop = run_lib.StopRequest()
  with stop:
    try:
      while step < total:
        loops = loops_at(config, step)
        end = next_boundary(config, step, total)
        chunk = chunks.get(loops)
        if chunk is None:
          chunk = chunks[loops] = make_train_chunk(family, model_def, tx,
                                                   int(config.train.batch_size), loops)
        state, bad, metrics = chunk(state, jnp.int32(step), end - step)
        bad = int(bad)
        if bad >= 0:
          good = ckpt.all_steps()
          raise RunError(f"non-finite loss or gradient at step {bad}; stopped without saving. "
                         f"Last good checkpoint: step {good[-1] if good else 'none'} (kept)")
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        losses = metrics["loss"]
        recent = {k: v[-int(config.train.steps_per_call):] for k, v in metrics.items()
                  if k != "grad_norm"}
        steps_since += end - step
        step = end
        now = time.time()
        steps_per_s = steps_since / max(now - t_last, 1e-9)
        if step % config.train.log_every == 0 or step == total:
          rlog.train_chunk(step, metrics, steps_per_s=steps_per_s, loops=loops,
                           learning_rate=float(learning_rate_schedule(config.train)(step)))
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
    model = model_def.merge(jax.device_get(state["params"]))
    last = dict(evaluate(model), step=step)
  return last
