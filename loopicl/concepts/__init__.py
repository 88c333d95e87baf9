"""The multi-concept classification family (Bu et al. 2024; docs/theory.md §5).

  task.py    the concept dictionary and the prompt sampler with its OOD variants
  model.py   softmax attention + ReLU MLP with a fixed output layer, loss and held-out metrics
  family.py  the family: schema, trainable variables, loss, evaluator, summary (registered)
  report.py  the offline report: scores, curves over training, the fitted 0-1 rate, figures
"""
