"""The reference-algorithm ladder of `loopicl.linear.algorithms`, scored inside a construction point.

Beside GD with the best constant step (the `construction` method), each construction point scores
five reference algorithms on the *same* held-out test prompts with the *same* per-prompt error
(`compute.per_prompt_error`), in float64, at every T of the point:

  * `cg`: conjugate gradients after T steps (the best any T-step Krylov method — GD with any step
    schedule included — can do per prompt in the Σ̂-norm; W_T = W_LS once T ≥ rank Σ̂);
  * `chebyshev`: Chebyshev-accelerated GD on the setting's Marchenko–Pastur edges
    (`algorithms.marchenko_pastur_edges` of its task config: fixed for every prompt);
  * `newton`: Newton–Schulz with α = 1/||Σ̂||_F, compared by loop count T (one Newton step per
    loop; Newton step T is worth 2^T GD steps of step α);
  * `whitened_gd`: the looped whitening construction (`algorithms.whitened_gd_predictions`) with
    its knobs (pq, η) fitted *once per seed, at T = grid.fixed_loops*, by
    `algorithms.fit_whitened_gd` on the first `WHITENED_FIT_PROMPTS` scan prompts of the seed (the
    test prompts are never fitted on), then read at every T.  A fit at each T would be the fairer
    rung but costs ~0.5 s × T per seed at d = 10 on a 2-core CPU (~40 s per seed for T = 1..12,
    plus a compile per T: ~12 min over the quick grid, as long as the rest of it), so the knobs
    are tuned for fixed_loops (~5 s per seed): at T ≠ fixed_loops they are not the per-T optimum.  The fit minimises the
    batch-mean query MSE — for vector_generation (queries e_1..e_d) that is ||Ŵ − W*||_F²/d, a
    proxy for the relative weight error the grid reports;
  * `gdpp`: GD++ (`construction.gdpp_params`: the same loop as whitened GD, γ = pq), its (γ, η)
    tuned jointly (`baselines.fit_gdpp`, a 2-D grid and zoom of the closed form; never worse than
    the tuned GD on the scan prompts) once per seed at T = grid.fixed_loops on all the seed's scan
    prompts, then read at every T (`construction.gdpp_iterates`).  Cost: ~4 s per seed and
    setting at d = 10, fixed_loops = 10, 2048 scan prompts on a 2-core CPU.

Every method gives all its iterates in one run ([steps + 1, …], entry t = t steps), so each is
run once to the point's largest T and read at every T.  Each rung's record per T has both the
single-query error's distribution and that of each prompt's expected error over the query E_q
(`expected_error.statistics`): from its weights W_t, or for whitened GD (given as predictions)
from its read-out at the d unit queries (`expected_error.effective_weights`).  `seed_ladder`
returns what the point file stores per seed under "ladder"; `outputs.rows_from_points` turns it
into results.csv rows.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from loopicl.linear import algorithms, baselines, construction, expected_error

METHODS = ("cg", "chebyshev", "newton", "whitened_gd", "gdpp")
LABELS = {"cg": "conjugate gradients", "chebyshev": "Chebyshev (MP edges)",
          "newton": "Newton–Schulz (step = loop)", "whitened_gd": "whitened GD (fitted at grid.fixed_loops)",
          "gdpp": "GD++ (γ, η tuned at grid.fixed_loops)"}
SHORT = {"cg": "CG", "chebyshev": "Chebyshev", "newton": "Newton–Schulz", "whitened_gd": "whitened GD",
         "gdpp": "GD++"}
WHITENED_FIT_PROMPTS = 512  # scan prompts the whitened-GD knobs are fitted on (its cost is the fit)


def spec() -> dict:
  """What the ladder's numbers depend on beyond the point itself (part of its fingerprint)."""
  return {"methods": list(METHODS), "whitened_fit_prompts": WHITENED_FIT_PROMPTS,
          "whitened_fit": "fixed_loops", "chebyshev_edges": "marchenko_pastur",
          "gdpp_fit": "fixed_loops, all scan prompts",
          "statistics": "single-query and expected error (E_q)"}


def _summary(per_prompt, expected, threshold: float) -> dict:
  """`expected_error.statistics` of one T's per-prompt errors and E_q, as Python numbers."""
  dist = expected_error.statistics(per_prompt, expected, threshold)
  return {k: (int(v) if k == "nonfinite" else float(v)) for k, v in dist.items()}


def seed_ladder(task, test, scan, loops, fit_loops: int, error_of: Callable,
                threshold: float, methods=METHODS, expected_of: Callable | None = None) -> dict:
  """The ladder on one seed's prompts: {method: {str(T): `expected_error.statistics` record}}.

  task: the setting's task config; test, scan: its `tasks.Batch`es (float64); loops: the point's
  T; fit_loops: the T whitened GD and GD++ are fitted at; threshold: ε·(error at W = 0);
  error_of(readouts [..., batch, d_out, m]) -> per-prompt errors [..., batch]; expected_of(W_eff
  [..., batch, d_out, d]) -> per-prompt E_q [..., batch] (None: E_q = the error, as for a weight
  error with no random query); methods: the rungs to run (grid.ladder).  Call under x64.  The
  whitened_gd and gdpp entries also hold their knobs ("pq" or "gamma", "step_size", "fit_loops")
  and the fit's scan MSE.
  """
  loops = sorted(int(T) for T in loops)
  steps = max(loops)
  lam_min, lam_max = algorithms.marchenko_pastur_edges(task)
  iterates = {
      "cg": lambda: algorithms.conjugate_gradient_iterates(test.X, test.Y, steps=steps),
      "chebyshev": lambda: algorithms.chebyshev_iterates(test.X, test.Y, steps=steps,
                                                         lam_min=lam_min, lam_max=lam_max),
      "newton": lambda: algorithms.newton_schulz_iterates(test.X, test.Y, steps=steps),
  }
  out = {}

  def scored(W, per_prompt):  # [steps + 1, prompts] each: the errors and E_q of W
    per_prompt = np.asarray(per_prompt)
    return per_prompt, per_prompt if expected_of is None else np.asarray(expected_of(W))

  for method in [m for m in iterates if m in methods]:
    W = iterates[method]()
    per_prompt, expected = scored(W, error_of(W @ test.X_query))
    out[method] = {str(T): _summary(per_prompt[T], expected[T], threshold) for T in loops}
  if "whitened_gd" in methods:
    k = min(WHITENED_FIT_PROMPTS, int(scan.X.shape[0]))
    pq, eta, fit_mse = algorithms.fit_whitened_gd(scan.X[:k], scan.Y[:k], scan.X_query[:k],
                                                  scan.targets[:k], steps=int(fit_loops))
    predict = lambda b: algorithms.whitened_gd_predictions(b.X, b.Y, b.X_query, steps=steps, p=pq,
                                                           q=1.0, step_size=eta)
    per_prompt, expected = scored(expected_error.effective_weights(predict, test),
                                  error_of(predict(test)))
    knobs = {"pq": float(pq), "step_size": float(eta), "fit_loops": int(fit_loops),
             "fit_scan_mse": float(fit_mse)}
    out["whitened_gd"] = {str(T): {**_summary(per_prompt[T], expected[T], threshold), **knobs}
                          for T in loops}
  if "gdpp" in methods:
    gamma, eta, fit_mse = baselines.fit_gdpp(scan.X, scan.Y, scan.X_query, scan.targets,
                                              steps=int(fit_loops))
    W = construction.gdpp_iterates(test.X, test.Y, steps=steps, step_size=eta, gamma=gamma)
    per_prompt, expected = scored(W, error_of(W @ test.X_query))
    knobs = {"gamma": float(gamma), "step_size": float(eta), "fit_loops": int(fit_loops),
             "fit_scan_mse": float(fit_mse)}
    out["gdpp"] = {str(T): {**_summary(per_prompt[T], expected[T], threshold), **knobs}
                   for T in loops}
  return out
