"""The linear family: looped linear transformers on in-context regression (docs/theory.md §1–4).

  tasks.py         prompts Z0 = [X, X_q; Y, 0], the task distribution (Σ, W*, noise)
  model.py         the looped block Z ← Z + (1/n)·P·Z M Zᵀ·Q·Z, its kernels, the NNX module
  construction.py  the GD construction and the one GD engine: iterates, least squares, ridge,
                   the best constant step (one T or many), rates and bounds
  algorithms.py    reference algorithms beyond GD: conjugate gradients, Chebyshev, Newton–Schulz,
                   progressively whitened GD (an exact looped construction)
  weights.py       scale-invariant comparison of (P, Q) with the construction
  training.py      how a model starts: random, or the GD warm start
  schema.py        the family's config schema: model fields, the `linear` section, their checks
  formatting.py    number and table formatting shared by the report and the ladder
  family.py        the family: schema, loss, training-time evaluator, summary (registered)
  evaluation.py    the offline report: per-prompt metrics against GD, `analyze` assembles it
  baselines.py     the baselines' tuned knobs on separate scan prompts (η*, c*·Σ⁻¹, ridge λ*)
  ladder.py        the algorithm ladder in the report: its knobs, errors, closeness to the model,
                   the closest algorithm, the mechanism (κ̂ of the input rows against the loop)
  report.py        the weight report, plain-language findings, report.json/.md, TensorBoard
  plots.py         the report's figures and the one weight heatmap
"""
