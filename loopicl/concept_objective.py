"""The multi-concept classification objective (PAPERS.md §5) for the shared training loop.

Same interface as objectives.LinearRegressionObjective: the model is a ConceptTransformer on
tokens H: [batch, 2·dim, L + 1], the loss is the logistic loss log(1 + exp(−z·f(H))), and the
held-out evaluation reports the 0-1 loss and cross-entropy in distribution and on every OOD
variant, the attention mass on the "correct" demonstrations and the concept/noise alignment of
the weights (concept_model.evaluate).
"""
from __future__ import annotations

import jax
from flax import nnx

from loopicl import concept_model, concepts


def _flatten(metrics: dict) -> dict:
  """ood = {variant: {zero_one, …}} -> also ood_<variant>_<metric> scalars for TensorBoard."""
  flat = dict(metrics)
  for variant, values in metrics.get("ood", {}).items():
    for name, value in values.items():
      flat[f"ood_{variant}_{name}"] = value
  return flat


class ConceptObjective:
  """ConceptTransformer trained with the logistic loss on concept-coded prompts."""

  def __init__(self, config):
    self.config = config
    self.task = config.task

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
            {"train_zero_one": concept_model.zero_one(logits, batch.labels)})

  def make_evaluator(self):
    key = jax.random.key(int(self.config.eval.seed))
    num_prompts = int(self.config.eval.num_prompts)

    def evaluate(model) -> dict:
      return _flatten(concept_model.evaluate(model, self.task, key, num_prompts))

    return evaluate
