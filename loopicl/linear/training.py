"""How a linear-family model starts: random, or the GD warm start (`model.init`, `model.init_step`)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from loopicl.linear import construction, model as model_lib


def create_model(config, rngs: nnx.Rngs) -> model_lib.LoopedLinearTransformer:
  """The model of `config`: random parameters ~ N(0, init_scale²), or the GD warm start.

  Warm start (`model.init = "gd"`): the GD construction with a small step η₀ = init_step, so the
  loop starts contractive on every prompt and large T cannot blow up at initialisation.  For
  `full` and `blocks` the random draw stays on top as noise (so the off-construction blocks of
  `full` can still learn); for `gd` A = η₀·I.
  """
  m, t = config.model, config.task
  model = model_lib.LoopedLinearTransformer(t.d, t.d_out, m.parameterization,
                                            init_scale=m.init_scale, remat=m.remat, unroll=m.unroll,
                                            form=m.form, kernel=m.kernel,
                                            threads=m.kernel_threads, rngs=rngs)
  if m.init == "gd":
    eta0 = float(m.init_step)
    P_gd, Q_gd = construction.gd_params(t.d, t.d_out, step_size=eta0, dtype=jnp.result_type(float))
    if m.parameterization == "full":
      model.P[...] = model.P[...] + P_gd
      model.Q[...] = model.Q[...] + Q_gd
    elif m.parameterization == "blocks":
      d = int(t.d)
      model.P_yy[...] = model.P_yy[...] + P_gd[d:, d:]
      model.Q_xx[...] = model.Q_xx[...] + Q_gd[:d, :d]
    else:
      model.A[...] = eta0 * jnp.eye(t.d, dtype=model.A[...].dtype)
  return model
