"""How a linear-family model starts and what its optimizer may move: the GD warm start and the
construction phase (the `model.init`, `model.init_step` and `train.construction_steps` knobs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from loopicl.linear import construction, model as model_lib

MODEL_INITS = ("random", "gd")  # model.init: random weights | the GD construction (step init_step) + noise


def create_model(config, rngs: nnx.Rngs) -> model_lib.LoopedLinearTransformer:
  """The model of `config`: random (P, Q) ~ N(0, init_scale²), or the GD warm start.

  Warm start (`model.init = "gd"`): the GD construction with a small step η₀ = init_step, so the
  loop starts contractive on every prompt and large T cannot blow up at initialisation.  For
  `full` the random draw N(0, init_scale²) stays on top as noise, so the off-construction blocks
  can still learn; for `gd` A = η₀·I.  With the construction mask on for the whole run
  (`train.construction_steps = -1`), the random init covers only the blocks it lets move.
  """
  m, t = config.model, config.task
  model = model_lib.LoopedLinearTransformer(t.d, t.d_out, m.parameterization,
                                            init_scale=m.init_scale, remat=m.remat, unroll=m.unroll,
                                            form=m.get("form", "reassociated"),
                                            kernel=m.get("kernel", "xla"),
                                            threads=m.get("kernel_threads", 0), rngs=rngs)
  if (m.parameterization == "full" and m.get("init", "random") == "random"
      and int(config.train.get("construction_steps", 0)) < 0):
    # The blocks the construction mask never lets move start at exactly 0: at random init they
    # would only set an error floor (init 1e-6: the median stops at ~1e-11 at n/d = 8, T = 20;
    # 1e-4 stopped it at 4e-8; docs/learning.md).
    d = t.d
    model.P[...] = jnp.zeros_like(model.P[...]).at[d:, d:].set(model.P[...][d:, d:])
    model.Q[...] = jnp.zeros_like(model.Q[...]).at[:d, :d].set(model.Q[...][:d, :d])
  if m.get("init", "random") == "gd":
    eta0 = float(m.get("init_step", 0.1))
    P_gd, Q_gd = construction.gd_params(t.d, t.d_out, step_size=eta0, dtype=jnp.result_type(float))
    if m.parameterization == "full":
      model.P[...] = model.P[...] + P_gd
      model.Q[...] = model.Q[...] + Q_gd
    else:
      model.A[...] = eta0 * jnp.eye(t.d, dtype=model.A[...].dtype)
  return model


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
