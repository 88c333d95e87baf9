"""Reference algorithms beyond constant-step GD (docs/theory.md §7), on raw prompts.

Every method solves the same problem as `construction.gd_iterates`, W Σ̂ = b with Σ̂ = X Xᵀ/n and
b = Y Xᵀ/n, from W_0 = 0, and returns its iterates [steps + 1, batch, d_out, d]:
  * conjugate gradients: the T-th iterate minimises ||W − W_LS||_Σ̂ over {b·p(Σ̂) : deg p < T},
    the best any T-step Krylov method (GD with any step schedule included) can do per prompt;
  * Chebyshev-accelerated GD on spectrum bounds [λ₋, λ₊] (fixed for the task distribution via
    `marchenko_pastur_edges`, or per prompt from `construction.covariance_extremes`);
  * Newton–Schulz for Σ̂⁻¹ (k steps = 2^k GD steps; its entry 0 is b·M_0 = α·b, not 0);
  * progressively whitened GD: the looped transformer with P_xx = p·I, Q_xx = −q·I
    (`whitened_gd_weights`), whose read-outs `whitened_gd_predictions` reproduces exactly — it is
    GD on the raw prompt with a preconditioner that changes every loop (`whitened_gd_iterates`),
    and `fit_whitened_gd` tunes its two knobs.
Each is a pure, jit-able function of arrays (T is static) and runs in float32 or float64.

Shapes: X [batch, d, n], Y [batch, d_out, n], X_query [batch, d, m], W [batch, d_out, d].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from loopicl.linear import construction, model as model_lib, tasks


def _check_number(name: str, value, allowed: str, ok) -> None:
  """One-line ValueError unless ok(value); traced values (inside jit) are not checked."""
  if isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value, np.float64)
  if not (np.all(np.isfinite(v)) and np.all(ok(v))):
    shown = " ".join(repr(value).split())  # one line, even for a [batch] array
    raise ValueError(f"{name}={shown} is invalid; allowed: {allowed}")


def _stack(W0, Ws):
  return jnp.concatenate([W0[None], Ws], axis=0)


def conjugate_gradient_iterates(X: jax.Array, Y: jax.Array, *, steps: int) -> jax.Array:
  """CG on Σ̂ wᵀ = bᵀ for each row w of W (d_out independent runs): [steps + 1, batch, d_out, d].

  Rows are treated as vectors, so with residual r = b − W Σ̂ and direction p (both [.., d_out, d]):
  α = r·r / p Σ̂·p, W += α p, r' = r − α p Σ̂, β = r'·r' / r·r, p = r' + β p.  In exact arithmetic
  W_T = W_LS at T = rank(Σ̂) (= d when Σ̂ is nonsingular).  A row whose residual is exactly 0 has
  converged: both ratios are then 0/0 and are set to 0, so it keeps its iterate (no NaN).
  """
  model_lib._check_positive_int("steps", steps)
  return _conjugate_gradient(X, Y, steps=steps)


@functools.partial(jax.jit, static_argnames="steps")
def _conjugate_gradient(X, Y, *, steps: int):
  sigma_hat, b = construction.sufficient_statistics(X, Y)

  def ratio(num, den):  # num / den, or 0 where den = 0 (a converged row)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)[..., None]

  def step(carry, _):
    W, r, p, rr = carry
    p_sigma = p @ sigma_hat
    alpha = ratio(rr, jnp.sum(p * p_sigma, axis=-1))
    W, r = W + alpha * p, r - alpha * p_sigma
    rr_new = jnp.sum(r * r, axis=-1)
    p = r + ratio(rr_new, rr) * p
    return (W, r, p, rr_new), W

  W0 = jnp.zeros_like(b)
  carry = (W0, b, b, jnp.sum(b * b, axis=-1))
  return _stack(W0, jax.lax.scan(step, carry, length=steps)[1])


def chebyshev_iterates(X: jax.Array, Y: jax.Array, *, steps: int, lam_min, lam_max) -> jax.Array:
  """Chebyshev-accelerated GD for spectrum bounds [λ₋, λ₊]: [steps + 1, batch, d_out, d].

  lam_min, lam_max: scalars or [batch] arrays, 0 ≤ λ₋ ≤ λ₊, λ₊ > 0.  With θ = (λ₊+λ₋)/2 and
  δ = (λ₊−λ₋)/2, W_T − W_LS = (W_0 − W_LS)·p_T(Σ̂), where p_T(λ) = T_T((θ−λ)/δ) / T_T(θ/δ) is the
  degree-T polynomial with p_T(0) = 1 of least sup norm on [λ₋, λ₊] (T_T: Chebyshev polynomial).
  So for a prompt whose non-zero eigenvalues lie inside the bounds, ||W_T − W_LS|| in the Σ̂-norm
  (or Frobenius) is at most 1/T_T((λ₊+λ₋)/(λ₊−λ₋)) = 2c^T/(1 + c^{2T}) ≤ 2c^T times its value at
  W_0 = 0, c = (√λ₊−√λ₋)/(√λ₊+√λ₋) (`chebyshev_factor`).  W_T is GD with T different steps (the
  reciprocals of p_T's roots); the recurrence gives the degree-t optimum at every t ≤ T, stably.

  The recurrence is Saad's three-term form (Iterative Methods, Alg. 12.1) with u_k = δ·ρ_k, which
  never divides by δ: λ₋ = λ₊ gives GD with the exact step 1/θ.
    W_{k+1} = W_k + D_k,  R_{k+1} = R_k − D_k Σ̂,  g = 1/(2θ − u_k),
    D_{k+1} = g·(u_k D_k + 2 R_{k+1}),  u_{k+1} = δ² g;   D_0 = R_0/θ, u_0 = δ²/θ, R_0 = b.
  """
  model_lib._check_positive_int("steps", steps)
  _check_number("lam_min", lam_min, "a finite number (or [batch] array) >= 0", lambda v: v >= 0)
  _check_number("lam_max", lam_max, "a finite number (or [batch] array) > 0", lambda v: v > 0)
  if not isinstance(lam_min, jax.core.Tracer):
    _check_number("lam_max", lam_max, "lam_max >= lam_min (elementwise)",
                  lambda v: v >= np.asarray(lam_min, np.float64))
  return _chebyshev(X, Y, jnp.asarray(lam_min, X.dtype), jnp.asarray(lam_max, X.dtype), steps=steps)


@functools.partial(jax.jit, static_argnames="steps")
def _chebyshev(X, Y, lam_min, lam_max, *, steps: int):
  sigma_hat, b = construction.sufficient_statistics(X, Y)
  lo, hi = lam_min[..., None, None], lam_max[..., None, None]
  theta, delta2 = (hi + lo) / 2, jnp.square((hi - lo) / 2)

  def step(carry, _):
    W, R, D, u = carry
    W, R = W + D, R - D @ sigma_hat
    g = 1 / (2 * theta - u)
    return (W, R, g * (u * D + 2 * R), delta2 * g), W

  W0 = jnp.zeros_like(b)
  carry = (W0, b, b / theta, jnp.broadcast_to(delta2 / theta, theta.shape))
  return _stack(W0, jax.lax.scan(step, carry, length=steps)[1])


def chebyshev_factor(lam_min, lam_max, steps: int) -> jax.Array:
  """1/T_t((λ₊+λ₋)/(λ₊−λ₋)) for t = 0..steps: [steps + 1, *λ.shape], Chebyshev's error factor."""
  model_lib._check_positive_int("steps", steps)
  lo, hi = jnp.sqrt(jnp.asarray(lam_min)), jnp.sqrt(jnp.asarray(lam_max))
  c = (hi - lo) / (hi + lo)
  ct = c ** jnp.arange(steps + 1).reshape((-1,) + (1,) * c.ndim)
  return 2 * ct / (1 + ct * ct)  # = 1 / cosh(t·arccosh(1/c)), without overflow


def marchenko_pastur_edges(task_config, *, floor: float = 1e-3) -> tuple[float, float]:
  """(λ₋, λ₊) = (λ_min(Σ)(1 − √(d/n))², λ_max(Σ)(1 + √(d/n))²), λ₋ clamped to ≥ floor·λ₊.

  The asymptotic (d, n → ∞) edges of Σ̂'s non-zero spectrum (docs/theory.md §6): the white
  Marchenko–Pastur edges times Σ's extremes, since Σ̂ = Σ^{1/2} Σ̂_w Σ^{1/2}.  For n < d the same
  formula bounds the n non-zero eigenvalues, the only ones that matter (iterates from W = 0 stay in
  X's row space).  At n = d the lower edge is 0, where Chebyshev's bound is 1 (no guaranteed
  progress), and near it a finite-d prompt's smallest eigenvalue fluctuates far from the edge;
  hence the floor, κ ≤ 1/floor = 1000 by default: a contracting polynomial for the bulk, at the
  price of not resolving eigenvalues below floor·λ₊.
  """
  tasks.validate(task_config)
  _check_number("floor", floor, "a number in (0, 1)", lambda v: (v > 0) & (v < 1))
  spectrum = tasks.covariance_spectrum(task_config)
  root = np.sqrt(task_config.d / task_config.n_context)
  hi = float(spectrum.max() * (1 + root) ** 2)
  return max(float(spectrum.min() * (1 - root) ** 2), floor * hi), hi


def newton_schulz_iterates(X: jax.Array, Y: jax.Array, *, steps: int, scale=None) -> jax.Array:
  """Newton–Schulz for Σ̂⁻¹, M_{k+1} = M_k(2I − Σ̂M_k), W_k = b·M_k: [steps + 1, batch, d_out, d].

  Entry k is W_k = b·M_k, k = 0..steps; entry 0 is b·M_0 = α·b (one GD step), not 0.
  M_0 = α·I with α = `scale` (a number or [batch] array), default α = 1/||Σ̂||_F per prompt.
  Since I − Σ̂M_{k+1} = (I − Σ̂M_k)², I − Σ̂M_k = (I − αΣ̂)^(2^k) and on Σ̂'s range
  ||I − Σ̂M_k||₂ = ||I − Σ̂M_0||₂^(2^k): quadratic convergence iff 0 < α < 2/λ_max.  Also
  M_k = Σ_{j<2^k} (I − αΣ̂)^j α, so W_k equals 2^k GD steps of step α from W = 0.
  Why 1/||Σ̂||_F: λ_max ≤ ||Σ̂||_F ≤ √rank·λ_max, so every non-zero eigenvalue maps into (0, 1]:
  convergence is guaranteed, monotone (no eigencomponent overshoots) and needs no
  eigendecomposition — which would already be most of the solve, and which a looped transformer
  cannot run either; the price against α = 1/λ_max is at most log₂√rank Newton steps (< 2 for
  d ≤ 16).  The per-prompt optimum α = 2/(λ_max+λ_min) is `scale=construction.optimal_step_size(X)`.
  """
  model_lib._check_positive_int("steps", steps)
  if scale is not None:
    _check_number("scale", scale, "a finite number (or [batch] array) > 0", lambda v: v > 0)
    scale = jnp.asarray(scale, X.dtype)
  return _newton_schulz(X, Y, scale, steps=steps)


@functools.partial(jax.jit, static_argnames="steps")
def _newton_schulz(X, Y, scale, *, steps: int):
  sigma_hat, b = construction.sufficient_statistics(X, Y)
  if scale is None:
    fro = jnp.linalg.norm(sigma_hat, axis=(-2, -1))
    scale = jnp.where(fro > 0, 1 / jnp.where(fro > 0, fro, 1), 0)  # Σ̂ = 0: M = 0, W = 0
  eye = jnp.eye(X.shape[-2], dtype=X.dtype)
  M0 = jnp.asarray(scale, X.dtype)[..., None, None] * jnp.broadcast_to(eye, sigma_hat.shape)

  def step(M, _):
    M = M @ (2 * eye - sigma_hat @ M)
    return M, b @ M

  return _stack(b @ M0, jax.lax.scan(step, M0, length=steps)[1])


def whitened_gd_weights(d: int, d_out: int = 1, *, p, q, step_size, dtype=None):
  """(P, Q), each [d + d_out, d + d_out]: P = [[p·I, 0], [0, (η/q)·I]], Q = [[−q·I, 0], [0, 0]].

  One loop Z ← Z + (1/n) P Z M Zᵀ Q Z on Z = [X_all; R_all] (context and query columns) is
    X_all ← X_all − (pq/n) X Xᵀ X_all,    R_all ← R_all − (η/n) R Xᵀ X_all,
  the GD construction (label rows: step p_y·q = η) plus the input whitening; q ≠ 0.
  """
  model_lib._check_positive_int("d", d)
  model_lib._check_positive_int("d_out", d_out)
  _check_whitening(p, q, step_size)
  _check_number("q", q, "a finite number != 0 (P's label block is step_size/q)", lambda v: v != 0)
  dtype = dtype or jnp.result_type(float)
  P = jnp.zeros((d + d_out,) * 2, dtype).at[:d, :d].set(p * jnp.eye(d, dtype=dtype))
  P = P.at[d:, d:].set(step_size / q * jnp.eye(d_out, dtype=dtype))
  return P, jnp.zeros_like(P).at[:d, :d].set(-q * jnp.eye(d, dtype=dtype))


def _check_whitening(p, q, step_size) -> None:
  _check_number("p", p, "a finite number", lambda v: True)
  _check_number("q", q, "a finite number", lambda v: True)
  _check_number("step_size", step_size, "a finite number > 0", lambda v: v > 0)


def whitened_gd_iterates(X: jax.Array, Y: jax.Array, *, steps: int, p, q, step_size) -> jax.Array:
  """The weights on the *raw* inputs of the whitened-GD loop: [steps + 1, batch, d_out, d].

  The loop (`whitened_gd_weights`) moves the inputs, X_t = C_t X with C_0 = I and
  C_{t+1} = (I − pq·Σ̂_t) C_t, Σ̂_t = C_t Σ̂ C_tᵀ, so the whitened problem's weights V_t act on
  X_t.  But its label rows hold Y − U_t X and −U_t x_q for U_t = V_t C_t, and by induction
    U_{t+1} = U_t − η (U_t Σ̂ − b) C_tᵀ C_t:
  GD on the raw problem with the preconditioner A_t = η C_tᵀC_t, which exists even when
  I − pqΣ̂_t is singular (V_t need not).  C_t is a polynomial in Σ̂ with eigenvalues
  c ↦ c(1 − pqλc²), so Σ̂_t's eigenvalues follow μ ↦ μ(1 − pqμ)²: κ̂ falls while pq·μ_max ≤ 1/3.
  Depends on p, q only through pq; pq = 0 is plain GD with step η.
  """
  model_lib._check_positive_int("steps", steps)
  _check_whitening(p, q, step_size)
  return _whitened(X, Y, jnp.asarray(p * q, X.dtype), jnp.asarray(step_size, X.dtype), steps=steps)


@functools.partial(jax.jit, static_argnames="steps")
def _whitened(X, Y, pq, eta, *, steps: int):
  sigma_hat, b = construction.sufficient_statistics(X, Y)
  C0 = jnp.broadcast_to(jnp.eye(X.shape[-2], dtype=X.dtype), sigma_hat.shape)

  def step(carry, _):
    U, C = carry
    Ct = jnp.swapaxes(C, -1, -2)
    U = U - eta * (U @ sigma_hat - b) @ (Ct @ C)
    return (U, C - pq * (C @ sigma_hat @ Ct) @ C), U

  U0 = jnp.zeros_like(b)
  return _stack(U0, jax.lax.scan(step, (U0, C0), length=steps)[1])


def whitened_gd_predictions(X: jax.Array, Y: jax.Array, X_query: jax.Array, *, steps: int, p, q,
                            step_size) -> jax.Array:
  """Query predictions of the whitened-GD loop after t = 0..steps loops: [steps + 1, batch, d_out, m].

  Entry t ≥ 1 is exactly `model.loop_readouts(*whitened_gd_weights(...), Z0, …)[t − 1]`: the
  queries are whitened along with the context, which U_t @ X_query on the raw queries accounts for.
  """
  return whitened_gd_iterates(X, Y, steps=steps, p=p, q=q, step_size=step_size) @ X_query


@functools.partial(jax.jit, static_argnames="steps")
def _whitened_errors(X, Y, X_query, targets, pqs, etas, *, steps: int) -> jax.Array:
  """Batch-mean query MSE after `steps` loops for each pair (pqs[i], etas[i]); non-finite: +inf."""
  def error(pair):
    W = _whitened(X, Y, pair[0], pair[1], steps=steps)[-1]
    err = jnp.mean(jnp.square(W @ X_query - targets))
    return jnp.where(jnp.isfinite(err), err, jnp.inf)
  return jax.lax.map(error, jnp.stack([pqs, etas], axis=-1))


def fit_whitened_gd(X, Y, X_query, targets, *, steps: int, alternations: int = 2,
                    rel_tol: float = 1e-3) -> tuple[float, float, float]:
  """(pq, η, error): the whitened-GD knobs minimising the batch-mean query MSE after `steps` loops.

  Coordinate descent, each axis a `construction.zoom_minimize` search (33-point coarse grid, then
  17 points across the best bracket until it is narrower than rel_tol·η, or rel_tol·(pq grid's end)):
  η on a log grid over [1e-3, 8]/min λ_max(Σ̂) at pq = 0 (plain GD), then `alternations` rounds of
  pq on a linear grid over [0, 1/median λ_max] followed by η.  The best point seen is returned, so
  the fit is never worse than the best constant-step GD found on the first axis.
  """
  model_lib._check_positive_int("steps", steps)
  model_lib._check_positive_int("alternations", alternations)
  _check_number("rel_tol", rel_tol, "a number in (0, 1)", lambda v: (v > 0) & (v < 1))
  lam_max = np.asarray(construction.covariance_extremes(X)[1])
  eta_grid = np.geomspace(1e-3, 8.0, 33) / lam_max.min()
  pq_grid = np.linspace(0.0, 1.0, 33) / np.median(lam_max)

  def search(grid, fixed, done, eta_axis):  # minimise along one axis, the other knob fixed
    def errors_of(g):
      pqs, etas = (np.full_like(g, fixed), g) if eta_axis else (g, np.full_like(g, fixed))
      return np.asarray(_whitened_errors(X, Y, X_query, targets, jnp.asarray(pqs, X.dtype),
                                         jnp.asarray(etas, X.dtype), steps=steps))
    return construction.zoom_minimize(errors_of, grid, done=done,
                                      refine=lambda lo, hi: np.linspace(lo, hi, 17))

  # η is zoomed to a relative width; pq (whose best may be 0) to a width relative to its grid.
  eta_done = lambda lo, best, hi: hi - lo <= rel_tol * best
  pq_done = lambda lo, best, hi: hi - lo <= rel_tol * pq_grid[-1]
  pq = 0.0
  eta, err = search(eta_grid, pq, eta_done, eta_axis=True)
  best = (pq, eta, err)
  for _ in range(alternations):
    pq, err = search(pq_grid, eta, pq_done, eta_axis=False)
    best = min(best, (pq, eta, err), key=lambda t: t[2])
    eta, err = search(eta_grid, pq, eta_done, eta_axis=True)
    best = min(best, (pq, eta, err), key=lambda t: t[2])
  return best
