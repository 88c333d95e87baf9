"""What a run trains on: the model, the task sampler, the loss and the held-out evaluation.

The training loop (train.py) is the same for every task family; an objective supplies the
family-specific pieces as pure functions:

  * `create_model(rngs)`          -> an NNX module;
  * `loss(model, batch, loops)`   -> (scalar loss, dict of scalar aux metrics);
  * `sample(key, batch_size)`     -> a batch of prompts (pure, jit-able);
  * `make_evaluator()`            -> `evaluate(model) -> dict` on a fixed held-out set.

`LinearRegressionObjective` covers `linear_regression` and `vector_generation` (PAPERS.md §1–4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopicl import construction, tasks, weights
from loopicl.model import LoopedLinearTransformer, loop_readouts


def finite_mean(values: jax.Array, axis=-1):
  """(mean over the finite entries, number of non-finite entries) along `axis`.

  A half-trained looped model can blow up (1e16, inf) on rare prompts; averaging those in would
  hide everything else, so they are counted and reported instead.
  """
  finite = jnp.isfinite(values)
  total = jnp.sum(jnp.where(finite, values, 0.0), axis=axis)
  count = jnp.sum(finite, axis=axis)
  mean = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
  return mean, jnp.sum(~finite, axis=axis)


class LinearRegressionObjective:
  """Looped linear transformer on in-context linear regression / vector generation."""

  def __init__(self, config):
    self.config = config
    self.task = config.task
    self.n_queries = tasks.num_queries(config.task)
    self._gd_curve = None
    if config.train.loss_normalization == "gd":
      self.gd_error_curve()  # computed here, eagerly: the loss is traced and needs constants

  # -- model and data ---------------------------------------------------------------------------
  def create_model(self, rngs: nnx.Rngs) -> LoopedLinearTransformer:
    m = self.config.model
    model = LoopedLinearTransformer(self.task.d, self.task.d_out, m.parameterization,
                                    init_scale=m.init_scale, remat=m.remat, unroll=m.unroll,
                                    form=m.get("form", "reassociated"),
                                    kernel=m.get("kernel", "xla"),
                                    threads=m.get("kernel_threads", 0), rngs=rngs)
    if m.get("init", "random") == "gd":
      # Warm start at the GD construction with a small step η₀: the loop starts contractive on
      # every prompt, so large T cannot blow up at initialisation.  For `full` the random draw
      # N(0, init_scale²) stays on top as noise, so the off-construction blocks can still learn.
      eta0 = float(m.get("init_step", 0.1))
      P_gd, Q_gd = construction.gd_params(self.task.d, self.task.d_out, step_size=eta0,
                                          dtype=jnp.result_type(float))
      if m.parameterization == "full":
        model.P[...] = model.P[...] + P_gd
        model.Q[...] = model.Q[...] + Q_gd
      else:
        model.A[...] = eta0 * jnp.eye(self.task.d, dtype=model.A[...].dtype)
    return model

  def sample(self, key, batch_size: int) -> tasks.Batch:
    return tasks.sample(key, self.task, batch_size)

  # -- loss -------------------------------------------------------------------------------------
  def loss_weights(self, loops: int) -> np.ndarray:
    """Weight of each loop's MSE in the loss: [loops], mean over the last `train.loss_loops`.

    With loss_normalization="gd" each loop's MSE is divided by the error of GD (best constant
    step for the final T) after as many steps, so every loop of the window counts equally instead
    of the first ones dominating (the GD error falls geometrically in t).
    """
    k = min(int(self.config.train.loss_loops), loops)
    w = np.zeros(loops)
    w[loops - k:] = 1.0 / k
    if self.config.train.loss_normalization == "gd":
      w = w / self.gd_error_curve()[:loops]
    return w

  def gd_error_curve(self) -> np.ndarray:
    """GD query MSE after t = 1..T steps (best constant step for T) on 1024 separate prompts."""
    if self._gd_curve is None:
      T = int(self.config.model.loops)
      b = self.sample(jax.random.key(int(self.config.eval.seed) + 7919), 1024)
      eta, _ = construction.best_constant_step(b.X, b.Y, b.X_query, b.targets, steps=T)
      W = construction.gd_iterates(b.X, b.Y, steps=T, step_size=eta)[1:]
      err = tasks.query_mse(W @ b.X_query, b.targets).mean(-1)
      self._gd_curve = np.maximum(np.asarray(err, np.float64), 1e-12)
    return self._gd_curve

  def loss(self, model, batch: tasks.Batch, loops: int):
    readouts = model(batch.Z0, loops=loops, n_queries=self.n_queries)   # [T, batch, d_out, m]
    per_loop = jnp.mean(jnp.square(readouts - batch.targets), axis=(1, 2, 3))  # [T]
    w = jnp.asarray(self.loss_weights(loops), per_loop.dtype)
    return jnp.sum(w * per_loop), {"last_loop_mse": per_loop[-1]}

  # -- evaluation -------------------------------------------------------------------------------
  def make_evaluator(self):
    """`evaluate(model) -> dict` on `eval.num_prompts` fixed held-out prompts.

    Reports the MSE after each loop 1..T (mean over finite prompts, with the count of non-finite
    ones), the error of GD with the best constant step at the same T on the same prompts (the step
    is scanned on separate prompts), their ratio, and the scale-invariant weight distance.
    """
    T = int(self.config.model.loops)
    key = jax.random.key(int(self.config.eval.seed))
    test = self.sample(jax.random.fold_in(key, 0), int(self.config.eval.num_prompts))
    scan = self.sample(jax.random.fold_in(key, 1), int(self.config.eval.num_prompts))
    eta, _ = construction.best_constant_step(scan.X, scan.Y, scan.X_query, scan.targets, steps=T)
    W_gd = construction.gd_iterates(test.X, test.Y, steps=T, step_size=eta)[-1]
    gd_error = float(jnp.mean(tasks.query_mse(W_gd @ test.X_query, test.targets)))
    vector_generation = self.task.kind == "vector_generation"
    d_out, n_queries = int(self.task.d_out), self.n_queries

    @jax.jit
    def _metrics(P, Q):
      readouts = model_readouts(P, Q, test.Z0, T, d_out, n_queries)
      per_prompt = tasks.query_mse(readouts, test.targets)               # [T, batch]
      mse, nonfinite = finite_mean(per_prompt)
      out = {"test_error_per_loop": mse, "nonfinite_per_loop": nonfinite,
             "weight_distance": weights.weight_distance(P, Q, d_out),
             "gd_step_equivalent": weights.gd_step_equivalent(P, Q, d_out)}
      if vector_generation:  # read-out = Ŵ_t when the queries are e_1..e_d
        out["weight_error_per_loop"] = finite_mean(
            tasks.relative_weight_error(readouts, test.W_star))[0]
      return out

    def evaluate(model) -> dict:
      P, Q = model.weights()
      m = jax.device_get(_metrics(P, Q))
      per_loop = [float(x) for x in m["test_error_per_loop"]]
      result = {
          "test_error": per_loop[-1],
          "test_error_per_loop": per_loop,
          "nonfinite_prompts": int(m["nonfinite_per_loop"][-1]),
          "gd_error": gd_error,
          "gd_ratio": per_loop[-1] / gd_error,
          "gd_step_size": eta,
          "weight_distance": float(m["weight_distance"]),
          "gd_step_equivalent": float(m["gd_step_equivalent"]),
      }
      if vector_generation:
        result["weight_error_per_loop"] = [float(x) for x in m["weight_error_per_loop"]]
      return result

    evaluate.gd_step_size = eta
    return evaluate

  def reference_weights(self, model):
    """The nearest plain-GD construction on the learned weights' scale: (P_ref, Q_ref), [D, D].

    P_ref = c·E with c the projection of P onto E, Q_ref = −(η̂/c)·F, so P_ref ⊗ Q_ref = η̂·G is
    the point of the GD line nearest to P ⊗ Q (see weights.py) — comparable entry by entry.
    """
    P, Q = (np.asarray(w, np.float64) for w in model.weights())
    d, d_out = int(self.task.d), int(self.task.d_out)
    eta = float(weights.gd_step_equivalent(P, Q, d_out))
    c = float(np.trace(P[d:, d:])) / d_out
    c = c if abs(c) > 1e-12 else 1.0
    P_ref, Q_ref = np.zeros_like(P), np.zeros_like(Q)
    P_ref[d:, d:] = c * np.eye(d_out)
    Q_ref[:d, :d] = -(eta / c) * np.eye(d)
    return P_ref, Q_ref


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def model_readouts(P, Q, Z0, loops, d_out, n_queries):
  """Read-outs of the plain looped model with weights (P, Q): [loops, batch, d_out, m]."""
  return loop_readouts(P, Q, Z0, loops=loops, d_out=d_out, n_queries=n_queries)


def make_objective(config):
  """The objective for `config.task.kind`."""
  if config.task.kind in tasks.TASK_KINDS:
    return LinearRegressionObjective(config)
  from loopicl import concepts
  if config.task.kind == concepts.KIND:
    from loopicl.concept_objective import ConceptObjective
    return ConceptObjective(config)
  raise ValueError(f"task.kind={config.task.kind!r} is invalid; allowed: "
                   f"{' | '.join(tasks.TASK_KINDS + (concepts.KIND,))}")
