"""GD in the eigenbasis of each prompt's Σ̂: its error after any number of steps in closed form.

With Σ̂ = X Xᵀ/n = V diag(λ) Vᵀ and b = Y Xᵀ/n, constant-step GD from W_0 = 0 (docs/theory.md §3)
is diagonal in V:

    W_T = b V diag(g_T(λ)) Vᵀ,    g_T(λ) = (1 − (1 − ηλ)^T) / λ    (= Tη at λ = 0),

so the read-out W_T X_query = α diag(g_T) β with α = b V [d_out, d] and β = Vᵀ X_query [d, m].
One eigendecomposition per prompt (O(d³)) then gives the error after *every* T for *every* step —
T = 200 costs what T = 1 costs, where iterating costs T matrix products per step size.
Preconditioned GD with A = c·Σ⁻¹ is plain GD with step c on the whitened prompt Σ^{-1/2}X
(`decompose(..., whitening=Σ^{-1/2})`), read out with the whitened queries.

For the weight error of vector generation (X_query = I) without whitening, β = Vᵀ is orthogonal:
||W_T − W*||_F = ||α diag(g_T) − W* V||_F, so β is dropped (`readout=None`) and the targets
rotated — O(d) per prompt and T instead of O(d²).

Everything here is float64 work (call under `jax.enable_x64`): after 200 steps the errors reach
1e-30, far below float32's resolution.  Shapes: X [batch, d, n], Y [batch, d_out, n],
X_query [batch, d, m]; a `Spectral` holds [batch, …] arrays.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.linear import construction

KINDS = ("mse", "relative")  # query MSE (linear regression) | ||Ŵ − W*||_F / ||W*||_F (vector generation)


class Spectral(NamedTuple):
  """One batch of prompts in the eigenbasis of their Σ̂.

  eigenvalues:  [batch, d]         λ of Σ̂ (ascending; clipped at 0).
  coefficients: [batch, d_out, d]  α = b V.
  readout:      [batch, d, m]      β = Vᵀ X_query, or None (weight error: β = I, targets rotated).
  targets:      [batch, d_out, m]  what the read-out is compared with (W* V when readout is None).
  scale:        [batch]            the error's denominator: d_out·m (MSE) or ||W*||_F² (relative).
  """
  eigenvalues: jax.Array
  coefficients: jax.Array
  readout: jax.Array | None
  targets: jax.Array
  scale: jax.Array


@functools.partial(jax.jit, static_argnames="kind")
def decompose(X, Y, X_query, targets, *, kind: str, whitening=None) -> Spectral:
  """The prompts' `Spectral` for error `kind` ("mse" or "relative"; "relative" needs
  X_query = I and targets = W*).  whitening: S = Σ^{-1/2} [d, d] for preconditioned GD with
  A = c·Σ⁻¹ (then the error is still measured in the original coordinates)."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is invalid; allowed: {' | '.join(KINDS)}")
  if whitening is not None:
    S = jnp.asarray(whitening, X.dtype)
    X, X_query = S @ X, S @ X_query
  sigma_hat, b = construction.sufficient_statistics(X, Y)
  lam, V = jnp.linalg.eigh(sigma_hat)
  alpha = b @ V
  if kind == "relative":
    scale = jnp.sum(jnp.square(targets), axis=(-2, -1))
    if whitening is None:  # X_query = I: β = Vᵀ is orthogonal, rotate the targets instead
      return Spectral(jnp.maximum(lam, 0.0), alpha, None, targets @ V, scale)
  else:
    scale = jnp.full(X.shape[:-2], targets.shape[-2] * targets.shape[-1], X.dtype)
  return Spectral(jnp.maximum(lam, 0.0), alpha, jnp.swapaxes(V, -1, -2) @ X_query, targets, scale)


def _positive(lam):
  """Which eigenvalues are non-zero: λ > 1e-12·λ_max (the rest are Σ̂'s null space, where b V = 0)."""
  return lam > 1e-12 * lam[..., -1:]


MAX_LOOPS = 4095  # T < 2^12: the bits `_power_and_sum` walks


def _power_and_sum(lam, step, loops, max_loops: int = MAX_LOOPS):
  """(r^T, S_T = Σ_{j<T} r^j) with r = 1 − ηλ, for T = loops [L]: two [L, batch, d] arrays.

  By binary powering from the top bit of T (T traced, ≤ max_loops ≤ MAX_LOOPS): doubling k → 2k is
  S ← S(1 + r^k), r^k ← (r^k)²; adding one is S ← 1 + r·S, r^k ← r·r^k.  Multiplications only —
  float64 logs and exps are scalar library calls on a CPU, several times slower — and
  1 − r^T = ηλ·S_T is then exact even when r^T ≈ 1 (small ηλ·T) with no division by λ:
  g_T(λ) = η·S_T, = Tη at λ = 0.  Past the edge (|r| > 1) both grow until they overflow to inf.
  """
  eta = jnp.asarray(step, lam.dtype)
  r = 1.0 - (eta[..., None] if eta.ndim else eta) * lam
  T = jnp.asarray(loops, jnp.int32).reshape((-1,) + (1,) * lam.ndim)
  # η may be a scalar, [batch] (one per prompt) or [L, 1] (one per T): broadcast all three.
  power = jnp.ones(jnp.broadcast_shapes(T.shape, r.shape), lam.dtype)
  total = jnp.zeros_like(power)
  for bit in reversed(range(int(max_loops).bit_length())):
    total, power = total * (1.0 + power), power * power
    on = ((T >> bit) & 1) == 1
    total, power = jnp.where(on, 1.0 + r * total, total), jnp.where(on, r * power, power)
  return power, total


def _power(lam, step, loops):
  """(1 − ηλ)^T: [L, batch, d]."""
  return _power_and_sum(lam, step, loops)[0]


def gain(lam, step, loops, max_loops: int = MAX_LOOPS):
  """g_T(λ) = (1 − (1 − ηλ)^T)/λ = η·Σ_{j<T}(1 − ηλ)^j (Tη at λ = 0): [L, batch, d]."""
  eta = jnp.asarray(step, lam.dtype)
  return (eta[..., None] if eta.ndim else eta) * _power_and_sum(lam, step, loops, max_loops)[1]


def _error(sp: Spectral, read, kind: str):
  """Per-prompt error of read-outs `read` [..., batch, d_out, m] against sp.targets."""
  sq = jnp.sum(jnp.square(read - sp.targets), axis=(-2, -1)) / sp.scale
  return jnp.sqrt(sq) if kind == "relative" else sq


def _read(sp: Spectral, diag):
  """α diag(diag) β: diag [..., batch, d] -> [..., batch, d_out, m]."""
  weighted = sp.coefficients * diag[..., None, :]
  if sp.readout is None:
    return weighted
  # A broadcast product summed over k, not a batched matmul: XLA's CPU batched matmul of
  # [1, d] @ [d, 1] blocks is several times slower than this elementwise form.
  return jnp.sum(weighted[..., :, :, None] * sp.readout[..., None, :, :], axis=-2)


@functools.partial(jax.jit, static_argnames=("kind", "max_loops"))
def errors(sp: Spectral, step, loops, *, kind: str, max_loops: int = MAX_LOOPS) -> jax.Array:
  """Per-prompt error after T steps of GD with step η (a scalar, [batch] one per prompt, or
  [L, 1] one per T): [len(loops), batch].  Every T ≤ max_loops."""
  return _error(sp, _read(sp, gain(sp.eigenvalues, step, loops, max_loops)), kind)


@functools.partial(jax.jit, static_argnames="kind")
def least_squares_error(sp: Spectral, *, kind: str) -> jax.Array:
  """Per-prompt error of least squares (GD's limit, W_LS = b Σ̂⁺): [batch]."""
  lam, pos = sp.eigenvalues, _positive(sp.eigenvalues)
  return _error(sp, _read(sp, jnp.where(pos, 1.0 / jnp.where(pos, lam, 1.0), 0.0)), kind)


@functools.partial(jax.jit, static_argnames="kind")
def distance_to_least_squares(sp: Spectral, step, loops, *, kind: str) -> jax.Array:
  """Per-prompt distance of the T-step read-out to least squares' read-out — the optimisation
  error (with label noise the error against W* adds least squares' own error): [L, batch].
  Measured like `errors` (MSE, or ||W_T − W_LS||_F / ||W*||_F)."""
  lam, pos = sp.eigenvalues, _positive(sp.eigenvalues)
  power = _power(lam, step, loops)
  diag = jnp.where(pos, power / jnp.where(pos, lam, 1.0), 0.0)   # W_T − W_LS = −b V diag(r^T/λ) Vᵀ
  gap = _read(sp, diag)
  return _error(sp._replace(targets=jnp.zeros_like(sp.targets)), gap, kind)


@functools.partial(jax.jit, static_argnames="kind")
def oracle_bound(sp: Spectral, loops, *, kind: str) -> jax.Array:
  """The rate bound on `distance_to_least_squares` with each prompt's oracle step
  η_i = 2/(λ_max + λ_min) (positive λ): [L, batch].

  Every eigen-direction contracts by |1 − η_i λ| ≤ ρ_i = (κ̂_i − 1)/(κ̂_i + 1) per step, so
  ||W_T − W_LS||_F ≤ ρ_i^T ||W_LS||_F, and ||(W_T − W_LS) X_q||_F ≤ ||W_T − W_LS||_F ||X_q||_2:
    relative:  ρ_i^T ||W_LS||_F / ||W*||_F;
    mse:       ρ_i^{2T} ||W_LS||_F² ||β||_2² / (d_out·m)   (||β||_2 = ||X_q||_2 unwhitened).
  """
  lam, pos = sp.eigenvalues, _positive(sp.eigenvalues)
  lam_min = jnp.min(jnp.where(pos, lam, jnp.inf), axis=-1)
  rho = construction.convergence_rate(lam[..., -1] / lam_min)
  ls_sq = jnp.sum(jnp.square(sp.coefficients) * jnp.where(pos, 1.0 / jnp.where(pos, lam, 1.0) ** 2, 0.0)[..., None, :],
                  axis=(-2, -1))
  T = jnp.asarray(loops, lam.dtype)[:, None]
  if kind == "relative":
    return rho ** T * jnp.sqrt(ls_sq / sp.scale)
  beta_norm_sq = (1.0 if sp.readout is None
                  else jnp.linalg.norm(sp.readout, ord=2, axis=(-2, -1)) ** 2)
  return rho ** (2 * T) * ls_sq * beta_norm_sq / sp.scale


def oracle_step(sp: Spectral) -> jax.Array:
  """Each prompt's own optimal constant step 2/(λ_max + λ_min) over its positive λ: [batch]."""
  lam, pos = sp.eigenvalues, _positive(sp.eigenvalues)
  return 2.0 / (lam[..., -1] + jnp.min(jnp.where(pos, lam, jnp.inf), axis=-1))


@functools.partial(jax.jit, static_argnames=("kind", "max_loops"))
def mean_errors(sp: Spectral, steps, loops, *, kind: str, max_loops: int = MAX_LOOPS) -> jax.Array:
  """Mean error over the batch at each (η_j, T_j) pair: steps, loops [P] -> [P].

  +inf where any prompt's error is not finite (a step past some prompt's edge), so that a step
  search never picks it.  One pair at a time (lax.map): memory O(batch·d), not O(P·batch·d).
  """
  def one(pair):
    err = errors(sp, pair[0], pair[1][None], kind=kind, max_loops=max_loops)[0]
    mean = jnp.mean(err)
    return jnp.where(jnp.isfinite(mean), mean, jnp.inf)
  return jax.lax.map(one, (jnp.asarray(steps, sp.eigenvalues.dtype),
                           jnp.asarray(loops, sp.eigenvalues.dtype)))


SHOULDER = 1.1  # the tuned step is the smallest η whose scan mean is within 10% of the scan optimum


def tune_constant_step(sp: Spectral, loops, *, kind: str, shoulder: float | None = SHOULDER,
                       rel_tol: float = 2e-3, grid_points: int = 20, coarse_prompts: int = 16384):
  """The population baseline's constant step for each T: (η_rule [L], η* [L], scan mean at η* [L]).

  η* minimises the mean error over the (scan) prompts at T, by `construction.zoom_minimize_many`
  from a log grid over [1e-3·η_hi, η_hi] (η_hi = 4 / min λ_max, past which every prompt diverges)
  — scored on the first `coarse_prompts` prompts only, it just brackets the optimum — zoomed on
  all prompts until the bracket is narrower than rel_tol·η.  η* sits on a cliff: from T ≈ 20 on, the
  mean is decided by the prompts with the largest λ_max, so η* lands just inside the scan set's
  stability edge and a prompt of another set a little past it blows up (measured: tuned on one
  set of 65 536 prompts, the mean on another is up to 10¹¹× that set's own optimum at T = 200).
  The rule steps off the cliff to the gentle side: η_rule is the smallest η ≤ η* whose scan mean
  is ≤ `shoulder`·mean(η*) (bisection in log η).  Validated on separate prompt sets
  (docs/reproduction.md; results.csv `step_validation`).  shoulder=None skips the rule
  (η_rule = η*).
  """
  loops = [int(T) for T in loops]
  lam = sp.eigenvalues
  hi = 4.0 / float(jnp.min(lam[..., -1]))
  first = np.geomspace(1e-3 * hi, hi, grid_points)
  widths = sorted({len(loops), 9 * len(loops), grid_points * len(loops)})

  coarse = jax.tree.map(lambda x: x[:coarse_prompts], sp)
  first_round = True

  def means(pairs, s=sp):  # [(η, T)] -> mean errors, padded to one of three lengths (three programs)
    pad = next(w for w in widths if w >= len(pairs)) - len(pairs)
    etas = np.array([e for e, _ in pairs] + [pairs[-1][0]] * pad)
    Ts = np.array([T for _, T in pairs] + [pairs[-1][1]] * pad)
    return np.asarray(mean_errors(s, etas, Ts, kind=kind, max_loops=max(loops)))[:len(pairs)]

  def errors_of(grids):
    nonlocal first_round
    keys = list(grids)
    flat = means([(e, loops[j]) for j in keys for e in grids[j]], coarse if first_round else sp)
    first_round = False
    out, start = {}, 0
    for j in keys:
      out[j] = flat[start:start + len(grids[j])]
      start += len(grids[j])
    return out

  best = construction.zoom_minimize_many(
      errors_of, {j: first for j in range(len(loops))},
      done=lambda lo, b, hi: hi - lo <= rel_tol * b,
      refine=lambda lo, hi: np.linspace(lo, hi, 9))
  eta_star = np.array([best[j][0] for j in range(len(loops))])
  err_star = np.array([best[j][1] for j in range(len(loops))])
  if shoulder is None:
    return eta_star, eta_star, err_star
  # Bisection for the shoulder in log η on [η*/4, η*]: lo has mean > shoulder·min, hi ≤ it (a
  # mean still ≤ shoulder·min at η*/4, a flat optimum, takes η*/4).
  target = shoulder * err_star
  lo = eta_star / 4
  lo_ok = means([(lo[j], T) for j, T in enumerate(loops)]) <= target
  hi_ = eta_star.copy()
  for _ in range(10):
    mid = np.sqrt(lo * hi_)
    ok = means([(mid[j], T) for j, T in enumerate(loops)]) <= target
    hi_, lo = np.where(ok, mid, hi_), np.where(ok, lo, mid)
  rule = np.where(lo_ok, eta_star / 4, np.where(np.isfinite(err_star), hi_, eta_star))
  return rule, eta_star, err_star
