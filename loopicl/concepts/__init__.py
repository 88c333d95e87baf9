"""The multi-concept classification family (Bu et al. 2024; docs/theory.md §5).

  schema.py  the task config: every knob, its default and validation (re-exported by task.py)
  task.py    the concept dictionary and the prompt sampler with its OOD variants
  model.py   softmax attention + ReLU MLP with a fixed output layer, loss and held-out metrics
  family.py  the family: schema, trainable variables, loss, evaluator, summary (registered)
  diagnostics.py  inner products of the weights with sense/shared/noise directions, alignment
  report.py  the offline report: scores, curves over training, the fitted 0-1 rate
  figures.py the report's figures
"""
