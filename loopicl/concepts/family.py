"""The multi-concept classification family (docs/theory.md §5) for the shared training loop.

The model is a `ConceptTransformer` on tokens H: [batch, 2·dim, L + 1], the loss the logistic
loss log(1 + exp(−z·f(H))), the held-out evaluation the 0-1 loss and cross-entropy in
distribution and on every OOD variant, the attention mass on the "correct" demonstrations and the
weight diagnostics of diagnostics.py (model.evaluate).  Trainable: the nnx.Params only — the
±1/m output layer is a `FixedOutput` variable, so the training path never updates it.
"""
from __future__ import annotations

import os

import jax
import ml_collections
from flax import nnx

from loopicl import family as family_lib, fields as config_lib
from loopicl.concepts import model as concept_model, task as concepts


def _flatten(metrics: dict) -> dict:
  """ood = {variant: {zero_one, …}} -> also ood_<variant>_<metric> scalars for TensorBoard."""
  flat = dict(metrics)
  for variant, values in metrics.get("ood", {}).items():
    for name, value in values.items():
      flat[f"ood_{variant}_{name}"] = value
  return flat


class ConceptFamily(family_lib.Family):
  """ConceptTransformer trained with the logistic loss on concept-coded prompts."""

  kinds = (concepts.KIND,)
  shape_fields = ("task.dim", "task.num_concepts", "model.mlp_width", "model.heads")
  trainable = nnx.Param  # not FixedOutput: the output layer stays at ±1/m
  hparam_metrics = ("eval/test_zero_one", "eval/test_cross_entropy", "eval/ood_unseen_zero_one",
                    "eval/ood_switched_zero_one", "eval/correct_attention")

  @classmethod
  def task_config(cls):
    return concepts.default_config()

  @classmethod
  def model_config(cls):
    m = ml_collections.ConfigDict()
    m.heads = 1                 # softmax attention heads
    m.mlp_width = 32            # m: ReLU neurons; the output layer is fixed at ±1/m
    m.init_scale = 1.0          # weights ~ N(0, init_scale² / (2·dim))
    return m

  @classmethod
  def validate(cls, cfg) -> None:
    config_lib.check_task(concepts.validate, cfg.task)
    config_lib.field_real(cfg, "model", "init_scale", 0.0, strict=True)
    config_lib.field_int(cfg, "model", "heads")
    config_lib.field_int(cfg, "model", "mlp_width")

  def create_model(self, rngs: nnx.Rngs) -> concept_model.ConceptTransformer:
    m = self.config.model
    return concept_model.ConceptTransformer(
        2 * int(self.task.dim), mlp_width=int(m.mlp_width), heads=int(m.heads),
        loops=int(m.loops), init_scale=float(m.init_scale), rngs=rngs)

  def sample(self, key, batch_size: int) -> concepts.ConceptBatch:
    return concepts.sample(key, self.task, batch_size, "train")

  def loss(self, model, batch: concepts.ConceptBatch, loops: int):
    # `loops` is the model's own (structural) loop count here; the curriculum does not apply.
    logits = model(batch.H)
    return (concept_model.logistic_loss(logits, batch.labels),
            {"zero_one": concept_model.zero_one(logits, batch.labels)})

  def make_evaluator(self):
    key = jax.random.key(int(self.config.eval.seed))
    num_prompts = int(self.config.eval.num_prompts)

    def evaluate(model) -> dict:
      return _flatten(concept_model.evaluate(model, self.task, key, num_prompts))

    return evaluate

  def tensorboard_layout(self) -> dict:
    charts = super().tensorboard_layout()
    charts["classification"] = {
        "0-1 loss in and out of distribution": ["eval/test_zero_one", "eval/ood_.*_zero_one"],
        "cross-entropy": ["eval/test_cross_entropy", "eval/ood_.*_cross_entropy"],
        "attention and alignment": ["eval/correct_attention", "eval/correct_attention_uniform",
                                    "eval/attention_peak", "eval/alignment_.*"],
        "MLP inner products (sense, shared, noise)": ["eval/ip_mlp_.*"],
        "attention inner products (sense, shared, noise)": ["eval/ip_attn_.*"]}
    return charts

  def summary_lines(self, result: dict) -> list[str]:
    return [f"   {key:<30s}{result[key]:.4g}"
            for key in ("test_zero_one", "test_cross_entropy", "correct_attention") if key in result]

  def report(self, workdir: str, model, step: int, *, num_prompts: int = 4096,
             log_tensorboard: bool = True, log=print, **unused) -> dict:
    """Concept classification has no GD construction: scores, OOD variants and curves instead."""
    from loopicl import runlog
    from loopicl.concepts import report as concept_report
    report = concept_report.analyze(self.config, model, step, workdir, num_prompts)
    figs = concept_report.figures(report)
    outdir = os.path.join(workdir, "eval")
    concept_report.write(report, outdir, figs)
    if log_tensorboard:
      rl = runlog.RunLog(workdir)
      scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
      for variant, values in report.get("ood", {}).items():
        scalars.update({f"ood_{variant}_{k}": v for k, v in values.items()})
      rl.scalars(step, scalars, prefix="analysis/")
      for name, fig in figs.items():
        rl.figure(step, f"analysis/{name}", fig)
      rl.close()
    log(f"wrote {outdir}/report.md (step {step}, {num_prompts} prompts): test 0-1 "
        f"{report['test_zero_one']:.4g}; OOD " + ", ".join(
            f"{v} {s['zero_one']:.4g}" for v, s in report.get("ood", {}).items()))
    return report
