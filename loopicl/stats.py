"""Honest summaries of per-prompt numbers: finite means with counts, medians, quantiles, rate fits.

A half-trained looped model can blow up (1e16, inf, NaN) on rare prompts, and from T ≈ 10 on the
mean error over prompts is heavy-tailed: a few prompts with a large λ_max(Σ̂) decide it.  So no
summary here averages a non-finite value in: means are over the finite entries and come with the
count of the others, and medians count NaN as +inf (honest while fewer than half blow up).

Every function takes numpy or JAX arrays; `finite_mean` is jit-able (it stays in JAX for JAX
input).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def finite_mean(values, axis=-1):
  """(mean over the finite entries, number of non-finite entries) along `axis`.

  NaN where no entry is finite.  JAX in, JAX out (jit-able); numpy in, numpy out.
  """
  xp = jnp if isinstance(values, jax.Array) else np
  values = xp.asarray(values)
  finite = xp.isfinite(values)
  with np.errstate(invalid="ignore", over="ignore"):
    total = xp.sum(xp.where(finite, values, 0.0), axis=axis)
    count = xp.sum(finite, axis=axis)
    mean = xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)
  return mean, xp.sum(~finite, axis=axis)


def py_float(x) -> float | None:
  """A Python float, or None for NaN/inf (JSON null)."""
  x = float(x)
  return x if math.isfinite(x) else None


def summarize(values) -> dict[str, list]:
  """[loops, batch] -> {'mean': finite-prompt means, 'median': NaN→+inf medians, 'nonfinite': counts}.

  Lists over the leading axis; a mean or median that is not finite is None.
  """
  v = np.asarray(values, np.float64)
  mean, nonfinite = finite_mean(v)
  median = np.median(np.where(np.isnan(v), np.inf, v), axis=-1)
  return {"mean": [py_float(x) for x in mean], "median": [py_float(x) for x in median],
          "nonfinite": [int(x) for x in nonfinite]}


def quantiles(values, qs=(0.1, 0.25, 0.5, 0.75, 0.9), axis=-1) -> np.ndarray:
  """[len(qs), ...] quantiles along `axis` with NaN counted as +inf (as the median above)."""
  v = np.asarray(values, np.float64)
  return np.quantile(np.where(np.isnan(v), np.inf, v), qs, axis=axis)


def prompt_distribution(values, threshold) -> dict[str, np.ndarray]:
  """The distribution of per-prompt errors [..., batch] over the batch, each entry [...]:

  error: mean over the finite prompts; error_median, error_q90, error_q99: empirical quantiles
  (numpy's "inverted_cdf": a value some prompt has — no interpolation, so +inf for a non-finite
  prompt stays +inf instead of inf − inf = NaN); frac_below_eps: the fraction of prompts ≤ threshold (a
  non-finite one is not); nonfinite: the count of non-finite prompts.
  """
  v = np.asarray(values, np.float64)
  mean, nonfinite = finite_mean(v)
  q = np.quantile(np.where(np.isnan(v), np.inf, v), (0.5, 0.9, 0.99), axis=-1, method="inverted_cdf")
  with np.errstate(invalid="ignore"):
    below = np.mean(np.isfinite(v) & (v <= threshold), axis=-1)
  return {"error": mean, "error_median": q[0], "error_q90": q[1], "error_q99": q[2],
          "frac_below_eps": below, "nonfinite": nonfinite}


def log_linear_slope(x, y) -> float | None:
  """Least-squares slope of log(y) against x over the points with finite y > 0 (None if < 2).

  exp(slope) is the per-unit geometric factor r of y ≈ C·r^x.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(y) & (y > 0) & np.isfinite(x)
  if ok.sum() < 2:
    return None
  return float(np.polyfit(x[ok], np.log(y[ok]), 1)[0])
