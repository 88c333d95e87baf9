"""The linear task family: looped linear transformers on in-context regression (docs/theory.md §1–4).

Serves `linear_regression` and `vector_generation`.  The model is `LoopedLinearTransformer`
(optionally warm-started at the GD construction), the loss the query MSE over the last
`linear.loss_loops` loops (optionally each divided by GD's error after as many steps), the
training-time evaluator the per-loop query error next to GD with the best constant step, and the
offline report of `linear/evaluation.py` (scripts/evaluate.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopicl import family as family_lib, schedule, stats
from loopicl.linear import (baselines, construction, model as model_lib, schema, tail_sampling,
                            tasks, training, weights)


EXTRAPOLATION = 4  # the offline report reads the model at loops 1 … max(4T, 40) by default


def default_loops_max(trained_loops: int) -> int:
  """4·T, at least 40: far enough past T to see whether the learned loop keeps converging."""
  return max(EXTRAPOLATION * int(trained_loops), 40)


def extrapolation_verdict(error_T: float, error_far: float, nonfinite: int) -> str:
  """How the error past the trained T behaves: falls (below half of T's at the farthest loop),
  holds (within 2×), blows up (above 2×, or any prompt non-finite)."""
  if nonfinite or not np.isfinite(error_far):
    return "blows up"
  ratio = error_far / error_T if error_T > 0 else np.inf
  return "falls" if ratio < 0.5 else ("holds" if ratio <= 2.0 else "blows up")


class LinearFamily(family_lib.Family):
  """Looped linear transformer on in-context linear regression / vector generation."""

  kinds = tasks.TASK_KINDS
  section = "linear"
  shape_fields = ("task.d", "task.d_out", "model.parameterization")
  hparam_metrics = ("eval/test_error", "eval/gd_ratio", "eval/pgd_ratio", "eval/weight_distance")

  task_config = staticmethod(tasks.default_config)
  model_config = staticmethod(schema.model_config)
  section_config = staticmethod(schema.section_config)
  link = staticmethod(schema.link)
  validate = staticmethod(schema.validate)

  def __init__(self, config, training: bool = False):
    super().__init__(config, training)
    self.n_queries = tasks.num_queries(config.task)
    self._gd_curve = None
    m = config.model
    # The kernel, resolved once and explicitly: a training family builds and checks it now (a
    # run that cannot use model.kernel = "cpu" fails before any work); evaluation never needs it.
    self.kernel = model_lib.resolve_kernel(m.kernel, m.form) if training else "xla"
    self.tail_pool = tail_sampling.resolve_pool(config.linear.tail_pool, config.model.loops,
                                                config.task.d, config.task.n_context)

  # -- model and data ---------------------------------------------------------------------------
  def create_model(self, rngs: nnx.Rngs) -> model_lib.LoopedLinearTransformer:
    return training.create_model(self.config, rngs)

  def sample(self, key, batch_size: int) -> tasks.Batch:
    """A training batch, weighted: the tail-holding draw of `linear.tail_pool` /
    `linear.tail_prompts` (loopicl/linear/tail_sampling.py; pool 1 is uniform), scored by the
    fused kernel when the run trains on it.  Evaluation draws with tasks.sample."""
    return tail_sampling.sample(key, self.task, batch_size, self.tail_pool,
                                int(self.config.linear.tail_prompts), kernel=self.kernel == "cpu")

  # -- loss -------------------------------------------------------------------------------------
  def loss_weights(self, loops: int) -> np.ndarray:
    """Weight of each loop's MSE in the loss: [loops], mean over the last `linear.loss_loops`.

    With loss_normalization="gd" each loop's MSE is divided by the error of GD (best constant
    step for the final T) after as many steps, so every loop of the window counts equally instead
    of the first ones dominating (the GD error falls geometrically in t).
    """
    k = min(int(self.config.linear.loss_loops), loops)
    w = np.zeros(loops)
    w[loops - k:] = 1.0 / k
    if self.config.linear.loss_normalization == "gd":
      w = w / self.gd_error_curve()[:loops]
    return w

  def gd_error_curve(self) -> np.ndarray:
    """GD query MSE after t = 1..T steps (best constant step for T) on 1024 separate prompts."""
    if self._gd_curve is None:
      T = int(self.config.model.loops)
      b = tasks.sample(jax.random.key(int(self.config.eval.seed) + 7919), self.task, 1024)
      eta, _ = construction.best_constant_step(b.X, b.Y, b.X_query, b.targets, steps=T)
      W = construction.gd_iterates(b.X, b.Y, steps=T, step_size=eta)[1:]
      err = tasks.query_mse(W @ b.X_query, b.targets).mean(-1)
      self._gd_curve = np.maximum(np.asarray(err, np.float64), 1e-12)
    return self._gd_curve

  def make_loss(self):
    """The loss of the training step, on the kernel the family resolved."""
    kernel = self.kernel
    if self.config.linear.loss_normalization == "gd":
      self.gd_error_curve()  # computed now, eagerly: the loss is traced and needs constants

    def loss(model, batch: tasks.Batch, loops: int):
      readouts = model(batch.Z0, loops=loops, n_queries=self.n_queries, kernel=kernel)
      sq = jnp.square(readouts - batch.targets)                       # [T, batch, d_out, m]
      if batch.weight is None:
        per_loop = jnp.mean(sq, axis=(1, 2, 3))                         # [T]
      else:  # tail-holding batch: Σ_b w_b · MSE_b (linear.tail_pool)
        per_loop = jnp.mean(sq, axis=(2, 3)) @ batch.weight
      w = jnp.asarray(self.loss_weights(loops), per_loop.dtype)
      return jnp.sum(w * per_loop), {"last_loop_mse": per_loop[-1]}
    return loss

  def loss(self, model, batch, loops: int):
    return self.make_loss()(model, batch, loops)

  # -- evaluation -------------------------------------------------------------------------------
  def make_evaluator(self):
    """`evaluate(model) -> dict` on `eval.num_prompts` fixed held-out prompts.

    Reports the MSE after each loop 1..T (mean over finite prompts, with the count of non-finite
    ones), the error of GD with the best constant step at the same T on the same prompts (the step
    is scanned on separate prompts), their ratio, and the scale-invariant weight distance.  And
    the loop extrapolation (users run looped models deeper than trained): the errors after loops
    1 … k·T (k = linear.extrapolation), the ratio at k·T over T and its verdict (falls / holds /
    blows up, `extrapolation_verdict`).
    """
    T = int(self.config.model.loops)
    far = int(self.config.linear.extrapolation) * T
    key = jax.random.key(int(self.config.eval.seed))
    test = tasks.sample(jax.random.fold_in(key, 0), self.task, int(self.config.eval.num_prompts))
    scan = tasks.sample(jax.random.fold_in(key, 1), self.task, int(self.config.eval.num_prompts))
    eta, _ = construction.best_constant_step(scan.X, scan.Y, scan.X_query, scan.targets, steps=T)
    W_gd = construction.gd_iterates(test.X, test.Y, steps=T, step_size=eta)[-1]
    gd_error = float(jnp.mean(tasks.query_mse(W_gd @ test.X_query, test.targets)))
    # Preconditioned GD with A = c*·Σ⁻¹ (c* scanned on the same separate prompts): also inside
    # the model class, so a trained model above it has an optimisation problem.
    if float(self.task.condition_number) == 1.0:  # Σ = I: c*·Σ⁻¹ is η*·I, the same search
      c_pgd, pgd_error = eta, gd_error
    else:
      c_pgd, _ = baselines.best_preconditioner_scale(scan.X, scan.Y, scan.X_query, scan.targets,
                                                     self.task, steps=T)
      A_pgd = c_pgd * np.linalg.inv(tasks.covariance(self.task))
      W_pgd = construction.gd_iterates(test.X, test.Y, steps=T, preconditioner=A_pgd)[-1]
      pgd_error = float(jnp.mean(tasks.query_mse(W_pgd @ test.X_query, test.targets)))
    vector_generation = self.task.kind == "vector_generation"
    d_out, n_queries = int(self.task.d_out), self.n_queries

    @jax.jit
    def _metrics(P, Q):
      readouts = model_lib.jitted_readouts(P, Q, test.Z0, far, d_out, n_queries)
      per_prompt = tasks.query_mse(readouts, test.targets)               # [k·T, batch]
      mse, nonfinite = stats.finite_mean(per_prompt)
      out = {"test_error_per_loop": mse, "nonfinite_per_loop": nonfinite,
             "weight_distance": weights.weight_distance(P, Q, d_out),
             "gd_step_equivalent": weights.gd_step_equivalent(P, Q, d_out)}
      if vector_generation:  # read-out = Ŵ_t when the queries are e_1..e_d
        out["weight_error_per_loop"] = stats.finite_mean(
            tasks.relative_weight_error(readouts[:T], test.W_star))[0]
      return out

    def evaluate(model) -> dict:
      P, Q = model.weights()
      m = jax.device_get(_metrics(P, Q))
      extended = [float(x) for x in m["test_error_per_loop"]]
      per_loop = extended[:T]
      far_nonfinite = int(np.max(m["nonfinite_per_loop"][T - 1:]))
      result = {
          "test_error": per_loop[-1],
          "test_error_per_loop": per_loop,
          "nonfinite_prompts": int(m["nonfinite_per_loop"][T - 1]),
          "extrapolation_per_loop": extended,
          "extrapolation_ratio": extended[-1] / per_loop[-1] if per_loop[-1] > 0 else float("inf"),
          "extrapolation_nonfinite": far_nonfinite,
          "extrapolation": extrapolation_verdict(per_loop[-1], extended[-1], far_nonfinite),
          "gd_error": gd_error,
          "gd_ratio": per_loop[-1] / gd_error,
          "gd_step_size": eta,
          "pgd_error": pgd_error,
          "pgd_ratio": per_loop[-1] / pgd_error,
          "pgd_scale": c_pgd,
          "weight_distance": float(m["weight_distance"]),
          "gd_step_equivalent": float(m["gd_step_equivalent"]),
      }
      if vector_generation:
        result["weight_error_per_loop"] = [float(x) for x in m["weight_error_per_loop"]]
      return result

    evaluate.gd_step_size = eta
    return evaluate

  def log_extras(self, rlog, step: int, model, metrics: dict) -> None:
    """Heatmaps of the learned (P, Q) beside the GD construction at η*, moved to their scale."""
    from loopicl.linear import plots
    P, Q = (np.asarray(w, np.float64) for w in model.weights())
    P_ref, Q_ref, _ = weights.construction_at_learned_scale(P, Q, int(self.task.d_out),
                                                            metrics["gd_step_size"])
    rlog.figure(step, "weights/P_Q_vs_construction", plots.weight_heatmaps(
        P, Q, P_ref, Q_ref, title=f"step {step}: weight distance {metrics['weight_distance']:.3f}"))

  def tensorboard_layout(self) -> dict:
    charts = super().tensorboard_layout()
    charts["errors"] = {
        "query MSE after T loops: model, GD (best η*), PGD (best c·Σ⁻¹)":
            ["eval/test_error", "eval/gd_error", "eval/pgd_error"],
        "query MSE after every loop t": ["eval/per_loop/test_error_loop_.*"],
        "model / GD and model / PGD": ["eval/gd_ratio", "eval/pgd_ratio"],
        "distance to the GD line": ["eval/weight_distance"],
        "error after 4T loops / after T (extrapolation)": ["eval/extrapolation_ratio"]}
    return charts

  def summary_lines(self, result: dict) -> list[str]:
    if "test_error" not in result or "gd_error" not in result:
      return []
    verdict = "at or below" if result["gd_ratio"] <= 1.1 else "above"
    lines = [f"   test error after T loops      {result['test_error']:.4e}",
             f"   best constant-step GD error   {result['gd_error']:.4e} (eta={result['gd_step_size']:.4g})",
             f"   ratio model/GD                {result['gd_ratio']:.3f}  ({verdict} GD within 10%)",
             f"   weight distance to GD line    {result['weight_distance']:.3f}"]
    if result.get("nonfinite_prompts"):
      lines.append(f"   non-finite prompts            {result['nonfinite_prompts']}")
    if "extrapolation" in result:
      k = len(result["extrapolation_per_loop"]) // len(result["test_error_per_loop"])
      lines.append(f"   error after {k}T loops / T     {result['extrapolation_ratio']:.3g}  "
                   f"({result['extrapolation']})")
    return lines

  def report(self, workdir: str, model, step: int, *, loops_max: int | None = None,
             num_prompts: int = 4096, log_tensorboard: bool = True, log=print) -> dict:
    """`evaluation.analyze` of the checkpoint's (P, Q), written to `<workdir>/eval/` and logged
    to the run's TensorBoard under `analysis/…` at `step`.

    The trained T is the loop count the checkpoint was training at (`schedule.loops_at`:
    model.loops once a loop curriculum is over); baselines are tuned at that T; loops_max
    defaults to `default_loops_max(T)`.  Prompts come from `config.eval.seed` (fold_in 0:
    reported prompts, fold_in 1: scans — the training evaluator's own derivation).
    """
    import os
    from loopicl.linear import evaluation, plots, report as report_lib
    T = int(schedule.loops_at(self.config, step))
    loops_max = default_loops_max(T) if loops_max is None else loops_max
    P, Q = (np.asarray(w, np.float64) for w in model.weights())
    report = evaluation.analyze(P, Q, self.task, trained_loops=T, loops_max=loops_max,
                                num_prompts=num_prompts, seed=int(self.config.eval.seed))
    report["run"] = {"workdir": os.path.abspath(workdir), "step": int(step),
                     "parameterization": str(self.config.model.parameterization),
                     "loops": int(self.config.model.loops)}
    outdir = os.path.join(workdir, "eval")
    figures = plots.all_figures(report)
    report_lib.write_report(report, outdir, P, Q, figures=figures)
    if log_tensorboard:
      report_lib.log_to_tensorboard(report, figures, workdir, step)
    log(f"wrote {outdir}/report.md (step {step}, T={T}, loops 1..{loops_max}, "
        f"{num_prompts} prompts, {report['seconds']:.1f} s)")
    for line in report["findings"]:
      log(f"  - {line}")
    return report
