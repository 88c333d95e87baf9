"""Which algorithm did the loop learn?  The ladder of reference algorithms in the evaluation report.

`evaluation.analyze` scores the model against GD and PGD (`baselines`); this module adds the
ladder of `algorithms` and owns its part of the report:
  * `cg` (conjugate gradients, t steps: the best any t-step Krylov method can do per prompt),
    `chebyshev` (Chebyshev-accelerated GD on the task distribution's Marchenko–Pastur edges,
    fixed for every prompt), `chebyshev_oracle` (on each prompt's own [λ_min, λ_max] of Σ̂),
    `newton` (Newton–Schulz; its step t is worth 2^t GD steps, but it is compared by loop count
    as the looped model is: one Newton step per loop), `whitened_gd` (the looped whitening
    construction, `algorithms.whitened_gd_weights`, with (pq, η) fitted at the trained T by
    coordinate descent), `gdpp` (GD++, `construction.gdpp_params`: the same family of loops, its
    (γ, η) = (pq, η) from the joint 2-D search `baselines.fit_gdpp` on all the scan prompts at
    the trained T) and `gdpp_oracle` (each prompt's own (γ_i, η_i) at the trained T,
    `baselines.gdpp_oracle`: label-free, like chebyshev_oracle);
  * their knobs (`tune`), their iterates W_t on the raw inputs (`iterates`) and, per prompt and
    loop, the query error and the model's distance to each (`against_model`: the RMS prediction
    difference and the cosine of the sensitivity ∂ŷ/∂x_q with W_t), which
    `evaluation.per_prompt_metrics` computes in its chunks;
  * `closest`: the candidate (GD, PGD or a rung of the ladder) nearest the model in prediction
    L2 at the trained T, with its margin over the runner-up;
  * `mechanism`: how the model's loop moves its *input* rows, against the whitening construction:
    the median κ̂, λ_min, λ_max of X_t X_tᵀ/n (X_t = Z_t[:d, :n]) for t = 0..loops_max;
  * its sentences (`findings`, part of `report.findings`) and report.md tables (`markdown`).

Cost: the whitened fit (`algorithms.fit_whitened_gd`, coordinate zooms of ~400 batch errors) runs
on the first `FIT_PROMPTS` scan prompts, the GD++ fit (~1 700 closed-form batch errors, ~4 s for
4096 prompts at T = 5, d = 10 on a 2-core CPU) on all of them; both are memoised on the scan
prompts' recipe (task, seed, count, T: they depend on nothing else).  The GD++ oracle's per-prompt
search (~2 000 closed-form evaluations per prompt, ~1 s per 1000 prompts) runs with the other
per-prompt metrics; the mechanism's loop states and eigenvalues run on the first
`MECHANISM_PROMPTS` evaluation prompts.  Both counts are in the report.
Shapes: prompts as in `tasks.Batch`; W: [loops, batch, d_out, d]; P, Q: [D, D], D = d + d_out.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from loopicl import stats
from loopicl.linear import algorithms, baselines, construction, expected_error, model as model_lib, tasks
from loopicl.linear.formatting import TIE, fmt, loop_table, verdict

ALGORITHMS = ("cg", "chebyshev", "chebyshev_oracle", "newton", "whitened_gd", "gdpp", "gdpp_oracle")
CANDIDATES = ("gd", "pgd") + ALGORITHMS  # what `closest` ranks
LABELS = {"gd": "GD (η*)", "pgd": "PGD (c*·Σ⁻¹)", "cg": "conjugate gradients",
          "chebyshev": "Chebyshev (Marchenko–Pastur bounds)",
          "chebyshev_oracle": "Chebyshev (each prompt's λ_min, λ_max)",
          "newton": "Newton–Schulz (step t ≈ 2^t GD steps)", "whitened_gd": "whitened GD (fitted)",
          "gdpp": "GD++ (γ, η tuned for the mean)", "gdpp_oracle": "GD++ (each prompt's γ, η)"}
KNOBS = ("chebyshev_lambda_min", "chebyshev_lambda_max", "whitened_gd_pq", "whitened_gd_step",
         "gdpp_gamma", "gdpp_step")
FIT_PROMPTS, MECHANISM_PROMPTS = 512, 512
SPECTRUM = ("kappa_hat", "lambda_min", "lambda_max")
_FITS: dict = {}  # memo of `tune`'s whitened and GD++ fits, keyed by the scan prompts' recipe


def key(algorithm: str, metric: str) -> str:
  """The report key of metric ('error', 'expected_error', 'prediction_l2', 'sensitivity_cosine')
  for an algorithm.

  GD's comparisons predate the ladder and keep their unprefixed keys (`prediction_l2`, …).
  """
  unprefixed = algorithm == "gd" and metric not in ("error", "expected_error")
  return metric if unprefixed else f"{algorithm}_{metric}"


ERROR_KEYS = tuple(key(a, "error") for a in ALGORITHMS)
COMPARISON_KEYS = tuple(key(a, m) for a in ("pgd",) + ALGORITHMS
                        for m in ("prediction_l2", "sensitivity_cosine"))


def tune(scan: tasks.Batch, task_config, *, steps: int, memo=None) -> dict[str, float]:
  """The ladder's knobs (`KNOBS`, Python floats), set on the scan prompts at `steps` loops.

  Chebyshev's fixed bounds are the task's Marchenko–Pastur edges (no fit); whitened GD's (pq, η)
  come from `algorithms.fit_whitened_gd` on the first FIT_PROMPTS scan prompts (the construction
  is `whitened_gd_weights(p=pq, q=1, step_size=η)`), GD++'s (γ, η) from `baselines.fit_gdpp` on
  all of them (`construction.gdpp_params(step_size=η, gamma=γ)`).  memo: a hashable recipe of
  `scan` (or None).
  """
  lo, hi = algorithms.marchenko_pastur_edges(task_config)
  k = min(FIT_PROMPTS, scan.X.shape[0])
  recipe = None if memo is None else (memo, k, steps)
  fit = _FITS.get(recipe)
  if fit is None:
    fit = algorithms.fit_whitened_gd(scan.X[:k], scan.Y[:k], scan.X_query[:k], scan.targets[:k],
                                     steps=steps)[:2]
    fit += baselines.fit_gdpp(scan.X, scan.Y, scan.X_query, scan.targets, steps=steps)[:2]
    if recipe is not None:
      if len(_FITS) >= 16:
        _FITS.pop(next(iter(_FITS)))  # the oldest
      _FITS[recipe] = fit
  return dict(zip(KNOBS, (lo, hi) + fit))


def iterates(batch: tasks.Batch, knobs, *, loops: int,
             trained_loops: int | None = None) -> dict[str, jax.Array]:
  """name → the ladder's weights on the raw inputs after t = 1..loops steps: [loops, batch, d_out, d].

  knobs: `tune`'s dict (numbers or traced scalars); jit-able.  Newton's entry t is Newton step t.
  trained_loops: the T each prompt's GD++ oracle knobs are chosen for (default: loops).
  """
  X, Y = batch.X, batch.Y
  lo, hi = construction.covariance_extremes(X)
  gamma_i, eta_i = baselines.gdpp_oracle(X, steps=trained_loops or loops)
  out = {
      "cg": algorithms.conjugate_gradient_iterates(X, Y, steps=loops),
      "chebyshev": algorithms.chebyshev_iterates(X, Y, steps=loops,
                                                 lam_min=knobs["chebyshev_lambda_min"],
                                                 lam_max=knobs["chebyshev_lambda_max"]),
      "chebyshev_oracle": algorithms.chebyshev_iterates(X, Y, steps=loops, lam_min=lo, lam_max=hi),
      "newton": algorithms.newton_schulz_iterates(X, Y, steps=loops),
      "whitened_gd": algorithms.whitened_gd_iterates(X, Y, steps=loops, p=knobs["whitened_gd_pq"],
                                                     q=1.0, step_size=knobs["whitened_gd_step"]),
      "gdpp": construction.gdpp_iterates(X, Y, steps=loops, step_size=knobs["gdpp_step"],
                                         gamma=knobs["gdpp_gamma"]),
      "gdpp_oracle": construction.gdpp_iterates(X, Y, steps=loops, step_size=eta_i, gamma=gamma_i),
  }
  return {name: W[1:] for name, W in out.items()}  # t = 1..loops, aligned with the report's loops


def against_model(name: str, W, preds, sens, batch: tasks.Batch,
                  query_cov=None) -> dict[str, jax.Array]:
  """Per loop and prompt ([loops, batch] each): the algorithm's query error, its expected error
  over the query E_q (with query_cov = Σ_q, `expected_error.query_covariance`; noise-free
  targets, like the query error) and the model's distance to it, named by `key(name, …)`.

  W: the algorithm's weights [loops, batch, d_out, d]; preds [loops, batch, d_out, m] and sens
  [loops, batch, d_out, d]: the model's read-outs and sensitivity ∂ŷ/∂x_q (for a linear
  algorithm ∂(W_t x_q)/∂x_q = W_t).  prediction_l2 is ||ŷ − W_t X_q||_F / √m (RMS over
  queries), sensitivity_cosine the cosine of the flattened sens and W_t, sensitivity_l2 their
  Frobenius distance.
  """
  pred = W @ batch.X_query
  dot = jnp.sum(sens * W, axis=(-2, -1))
  norms = jnp.sqrt(jnp.sum(sens ** 2, axis=(-2, -1)) * jnp.sum(W ** 2, axis=(-2, -1)))
  expected = {} if query_cov is None else {
      key(name, "expected_error"): expected_error.expected_error(W, batch.W_star, query_cov)}
  return {**expected, key(name, "error"): tasks.query_mse(pred, batch.targets),
          key(name, "sensitivity_cosine"): dot / norms,
          key(name, "sensitivity_l2"): jnp.sqrt(jnp.sum((sens - W) ** 2, axis=(-2, -1))),
          key(name, "prediction_l2"): jnp.sqrt(jnp.sum((preds - pred) ** 2, axis=(-2, -1))
                                               / preds.shape[-1])}


def closest(r: dict, trained_loops: int) -> dict:
  """`closest_algorithm` (the candidate of least mean prediction L2 to the model at T),
  `closest_algorithm_margin` (runner-up's L2 / closest's; null when the closest is exactly 0 or
  not finite) and `closest_algorithm_ranking` ([[name, l2], …], nearest first, nulls last)."""
  l2 = {a: r[key(a, "prediction_l2")][trained_loops - 1] for a in CANDIDATES}
  ranking = sorted(l2.items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0))
  (best, d0), (_, d1) = ranking[0], ranking[1]
  margin = d1 / d0 if d0 and d1 is not None else None
  return {"closest_algorithm": None if d0 is None else best,
          "closest_algorithm_margin": None if margin is None else stats.py_float(margin),
          "closest_algorithm_ranking": [[a, v] for a, v in ranking]}


@functools.partial(jax.jit, static_argnames=("loops", "d", "n_queries"))
def input_spectrum(P, Q, Z0, *, loops: int, d: int, n_queries: int) -> tuple[jax.Array, ...]:
  """(κ̂, λ_min, λ_max) of X_t X_tᵀ/n, X_t = Z_t[:d, :n], for t = 0..loops: [loops + 1, batch] each."""
  n = Z0.shape[-1] - n_queries
  states = model_lib.loop_states(P, Q, Z0, loops=loops, n_queries=n_queries)
  X = jnp.concatenate([Z0[None], states])[..., :d, :n]
  lo, hi = construction.covariance_extremes(X)
  return jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.0), jnp.inf), lo, hi


def mechanism(P, Q, knobs, batch: tasks.Batch, *, loops: int, d: int, d_out: int,
              n_queries: int) -> dict:
  """The report's `mechanism`: for the model (P, Q) and the fitted whitening construction, the
  median over the first MECHANISM_PROMPTS evaluation prompts (NaN as +inf) of κ̂, λ_min and
  λ_max of the context inputs' covariance after t = 0..loops loops.

  The GD construction never moves the input rows (its curves are flat); the whitening
  construction maps Σ̂_t's eigenvalues μ ↦ μ(1 − pq·μ)², so κ̂ falls while pq·μ_max ≤ 1/3.
  """
  Pw, Qw = algorithms.whitened_gd_weights(d, d_out, p=knobs["whitened_gd_pq"], q=1.0,
                                          step_size=knobs["whitened_gd_step"], dtype=batch.Z0.dtype)
  Z0 = batch.Z0[:MECHANISM_PROMPTS]
  out = {"loops": list(range(loops + 1)), "prompts": int(Z0.shape[0])}
  for who, (PP, QQ) in (("model", (P, Q)), ("whitened_gd", (Pw, Qw))):
    curves = input_spectrum(jnp.asarray(PP), jnp.asarray(QQ), Z0, loops=loops, d=d,
                            n_queries=n_queries)
    for name, values in zip(SPECTRUM, curves):
      out[f"{who}_{name}_median"] = stats.summarize(np.asarray(values))["median"]
  return out


def findings(r: dict) -> list[str]:
  """Sentences for `report.findings`: which candidate the model is closest to at T, which rungs
  it beats (model/algorithm error, `formatting.TIE` rule), and how κ̂ of the input rows moves."""
  T, i, out = r["trained_loops"], r["trained_loops"] - 1, []
  name, margin = r.get("closest_algorithm"), r.get("closest_algorithm_margin")
  if name is not None:
    (_, l2), (runner, l2_runner) = r["closest_algorithm_ranking"][:2]
    by = ("infinitely closer" if margin is None else f"{margin:.3g}× closer" if margin > 1 + TIE
          else f"a tie ({margin:.3g}×)")
    out.append(f"at T={T} the model's predictions are closest to {LABELS[name]} (RMS prediction "
               f"difference {fmt(l2)}); the runner-up {LABELS[runner]} is at {fmt(l2_runner)}: {by}")
  model = r["model_error"][i]
  verdicts: dict[str, list] = {"beats": [], "matches": [], "loses to": []}
  for a in ALGORITHMS:
    ref = r[key(a, "error")][i]
    if model is not None and ref:
      verdicts[verdict(model / ref)].append(f"{LABELS[a]} ({model / ref:.3g}×)")
  parts = [f"{v} {', '.join(names)}" for v, names in verdicts.items() if names]
  if parts:
    out.append(f"model error at T={T} against the ladder (model/algorithm): the model "
               + "; ".join(parts))
  mech = r.get("mechanism")
  if mech:
    curves = [(who, mech[f"{who}_kappa_hat_median"]) for who in ("model", "whitened_gd")]
    out.append(f"median κ̂ of the input rows over loops 0 → {T} → {mech['loops'][-1]}: " + "; ".join(
        f"{'model' if who == 'model' else 'whitening construction'} "
        f"{fmt(k[0])} → {fmt(k[T])} → {fmt(k[-1])}" for who, k in curves))
  return out


_SHORT = {"gd": "GD η*", "pgd": "PGD c·Σ⁻¹", "cg": "CG", "chebyshev": "Chebyshev MP",
          "chebyshev_oracle": "Chebyshev oracle", "newton": "Newton–Schulz", "whitened_gd": "whitened GD",
          "gdpp": "GD++", "gdpp_oracle": "GD++ oracle"}


def markdown(r: dict) -> list[str]:
  """Lines of report.md: the ladder per loop (error and the model's distance to each), its ranking at T."""
  if "closest_algorithm_ranking" not in r:
    return []
  T, algos = r["trained_loops"], CANDIDATES
  lines = ["", "## Ladder of reference algorithms", "",
           "Each cell: the algorithm's query MSE (in brackets the model's RMS prediction difference to "
           "it). Every algorithm is compared by loop count; Newton–Schulz step t is worth 2^t GD "
           f"steps. Chebyshev MP on [{fmt(r['chebyshev_lambda_min'])}, "
           f"{fmt(r['chebyshev_lambda_max'])}]; whitened GD pq = {fmt(r['whitened_gd_pq'])}, "
           f"η = {fmt(r['whitened_gd_step'])} (fitted at T on {r['whitened_gd_fit_prompts']} scan "
           f"prompts); GD++ γ = {fmt(r.get('gdpp_gamma'))}, η = {fmt(r.get('gdpp_step'))} (the same "
           f"loop, tuned jointly at T on {r.get('gdpp_fit_prompts')} scan prompts); GD++ oracle: each "
           "prompt's (γ, η) minimising its worst eigen-direction at T.", ""]
  lines += loop_table(r, ["model"] + [_SHORT[a] for a in algos], lambda j: [fmt(r["model_error"][j])] + [
      f"{fmt(r[key(a, 'error')][j])} ({fmt(r[key(a, 'prediction_l2')][j])})"
      for a in algos])
  lines += ["", f"At T = {T}, nearest first:", "",
            "| algorithm | prediction L2 to the model | sensitivity cosine | error | model/algorithm |",
            "|---|---|---|---|---|"]
  model = r["model_error"][T - 1]
  for a, l2 in r["closest_algorithm_ranking"]:
    err, cos = r[key(a, "error")][T - 1], r[key(a, "sensitivity_cosine")][T - 1]
    ratio = model / err if model is not None and err else None
    lines.append(f"| {LABELS[a]} | {fmt(l2)} | {fmt(cos)} | {fmt(err)} | {fmt(ratio)} |")
  return lines
