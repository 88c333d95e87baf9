"""The optimizer of every run: global-norm clipping → Adam / AdamW / SGD / SOAP with the schedule.

What the optimizer may move is the model's business, not the optimizer's: a parameterization
holds exactly the entries it trains (`model.parameterization = "blocks"` has no off-block
entries at all), so there is no update mask here and the optimizer state has one structure per
(optimizer, parameter shapes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from loopicl import soap


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


def make_optimizer(train_config) -> optax.GradientTransformation:
  """clip → Adam / AdamW / SGD / SOAP (`train.optimizer`) with `learning_rate_schedule`."""
  t = train_config
  schedule = learning_rate_schedule(t)
  # Clipping is always in the chain (inf when off) so the optimizer state has one structure.
  clip = clip_by_global_norm(t.grad_clip if t.grad_clip > 0 else float("inf"))
  eps, b2 = float(t.adam_eps), float(t.adam_b2)
  if t.optimizer == "adam":
    opt = optax.adam(schedule, b2=b2, eps=eps)
  elif t.optimizer == "adamw":
    opt = optax.adamw(schedule, b2=b2, eps=eps, weight_decay=t.weight_decay)
  elif t.optimizer == "soap":
    opt = soap.soap(schedule, b2=b2, eps=eps, shampoo_decay=float(t.shampoo_decay),
                    precondition_every=int(t.precondition_every))
  else:
    opt = optax.sgd(schedule, momentum=float(t.momentum))
  return optax.chain(clip, opt)
