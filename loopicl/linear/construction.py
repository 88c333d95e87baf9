"""The exact GD construction and the plain-JAX reference algorithms (docs/theory.md §3).

With P = [[0,0],[0,I]] and Q = [[−A,0],[0,0]] the looped transformer computes, loop by loop,

    W_{t+1} = W_t − (1/n)(W_t X − Y) Xᵀ A,     W_0 = 0,

i.e. preconditioned gradient descent on L(W) = (1/2n)||W X − Y||_F² (A = η·I: plain GD), and
its read-out after t loops is W_t X_query.  This module builds those weights and the references
that a learned model is compared with: GD iterates, least squares, ridge, the per-prompt optimal
step, the best constant step over a batch of prompts, and the
convergence-rate bound.  GD's error after many T for many steps at once, in closed form, is
`loopicl.linear.spectral`'s (the reproduction grid's engine).  GD++ (docs/theory.md §8) is the
GD construction plus the x-row update X ← (I − γ·XXᵀ/n)X: its weights (`gdpp_params`), its
explicit recursion (`gdpp_readouts`, `gdpp_inputs`) and its closed form in Σ̂'s eigenbasis
(`gdpp_filters`, `gdpp_iterates`); `baselines` tunes its (γ, η).

Shapes: X [batch, d, n], Y [batch, d_out, n], X_query [batch, d, m], W [batch, d_out, d].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopicl.linear import model as model_lib


def _preconditioner(d: int, step_size, preconditioner, dtype) -> jax.Array:
  if (step_size is None) == (preconditioner is None):
    raise ValueError("step_size/preconditioner: give exactly one; allowed: step_size=<number > 0> "
                     "or preconditioner=<[d, d] matrix>")
  if preconditioner is None:
    if not np.isfinite(step_size) or step_size <= 0:
      raise ValueError(f"step_size={step_size!r} is invalid; allowed: a finite number > 0")
    return step_size * jnp.eye(d, dtype=dtype)
  A = jnp.asarray(preconditioner, dtype)
  if A.shape != (d, d):
    raise ValueError(f"preconditioner has shape {tuple(A.shape)}; allowed: ({d}, {d}) for d={d}")
  return A


def gd_params(d: int, d_out: int = 1, *, step_size: float | None = None,
              preconditioner=None, dtype=None) -> tuple[jax.Array, jax.Array]:
  """(P, Q), each [d + d_out, d + d_out], whose loops are GD with step η or preconditioner A."""
  model_lib._check_positive_int("d", d)
  model_lib._check_positive_int("d_out", d_out)
  dtype = dtype or jnp.result_type(float)
  return model_lib.gd_weights(_preconditioner(d, step_size, preconditioner, dtype), d_out)


def _check_gdpp(step_size, gamma) -> None:
  """One-line ValueError unless step_size > 0 and gamma are finite (numbers or [batch] arrays);
  traced values (inside jit) are not checked."""
  for name, value, ok, allowed in (("step_size", step_size, lambda v: v > 0, "a finite number > 0"),
                                   ("gamma", gamma, lambda v: True, "a finite number")):
    if isinstance(value, jax.core.Tracer):
      continue
    v = np.asarray(value, np.float64)
    if not (np.all(np.isfinite(v)) and np.all(ok(v))):
      raise ValueError(f"{name}={' '.join(repr(value).split())} is invalid; allowed: {allowed} "
                       "(or a [batch] array of them)")


def gdpp_params(d: int, d_out: int = 1, *, step_size: float, gamma: float,
                dtype=None) -> tuple[jax.Array, jax.Array]:
  """(P, Q) of GD++ (von Oswald et al.; docs/theory.md §8): the GD construction at step η plus
  the x-row block P_xx = (γ/η)·I, so that P_xx·Q_xx = −γ·I and P_yy = I:

      P = [[(γ/η)·I, 0], [0, I]],      Q = [[−η·I, 0], [0, 0]].

  One loop maps every input column, context and query alike, X_all ← (I − γ·X Xᵀ/n)·X_all (X: the
  context columns, the only keys), and the label rows R_all ← R_all − η·(R Xᵀ/n)·X_all (a GD step).
  γ = 0 gives `gd_params(d, d_out, step_size=η)` bit for bit.
  """
  model_lib._check_positive_int("d", d)
  model_lib._check_positive_int("d_out", d_out)
  _check_gdpp(step_size, gamma)
  dtype = dtype or jnp.result_type(float)
  eye = jnp.eye(d, dtype=dtype)
  P, Q = model_lib.gd_weights(step_size * eye, d_out)
  return P.at[:d, :d].set((gamma / step_size) * eye), Q


def gd_transformer(d: int, d_out: int = 1, *, step_size: float | None = None,
                   preconditioner=None, dtype=None, **model_kwargs) -> model_lib.LoopedLinearTransformer:
  """A `full`-parameterization LoopedLinearTransformer whose t-th loop is the t-th GD step."""
  P, Q = gd_params(d, d_out, step_size=step_size, preconditioner=preconditioner, dtype=dtype)
  model = model_lib.LoopedLinearTransformer(d, d_out, "full", dtype=P.dtype, rngs=nnx.Rngs(0),
                                            **model_kwargs)
  model.P[...] = P
  model.Q[...] = Q
  return model


def empirical_covariance(X: jax.Array) -> jax.Array:
  """Σ̂ = X Xᵀ / n: [batch, d, d]."""
  return X @ jnp.swapaxes(X, -1, -2) / X.shape[-1]


def sufficient_statistics(X: jax.Array, Y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ̂ = X Xᵀ / n [batch, d, d], b = Y Xᵀ / n [batch, d_out, d]): all that GD on a prompt needs,
  so that a step costs O(d²) instead of O(d·n)."""
  return empirical_covariance(X), Y @ jnp.swapaxes(X, -1, -2) / X.shape[-1]


def _gd_scan(W0, sigma_hat, b, direction, observe, *, steps: int):
  """The one GD step loop: W_{t+1} = W_t − direction(W_t Σ̂ − b) from W0; observe(W_t) for
  t = 1..steps, stacked on a leading axis."""
  def step(W, _):
    W = W - direction(W @ sigma_hat - b)
    return W, observe(W)
  return jax.lax.scan(step, W0, length=steps)[1]


def gd_iterates(X: jax.Array, Y: jax.Array, *, steps: int, step_size=None,
                preconditioner=None) -> jax.Array:
  """W_0 = 0, …, W_T of (preconditioned) GD on (1/2n)||W X − Y||²: [T + 1, batch, d_out, d].

  `step_size` may be a scalar or a [batch] array (one step per prompt).
  """
  model_lib._check_positive_int("steps", steps)
  d = X.shape[-2]
  if preconditioner is None:
    if step_size is None:
      raise ValueError("step_size/preconditioner: give exactly one; allowed: step_size=<number > 0 "
                       "or [batch] array> or preconditioner=<[d, d] matrix>")
    eta = jnp.asarray(step_size, X.dtype)
    A = eta[..., None, None] * jnp.eye(d, dtype=X.dtype)
  else:
    A = _preconditioner(d, step_size, preconditioner, X.dtype)
  sigma_hat, b = sufficient_statistics(X, Y)
  W0 = jnp.zeros(Y.shape[:-1] + (d,), X.dtype)
  Ws = _gd_scan(W0, sigma_hat, b, lambda g: g @ A, lambda W: W, steps=steps)
  return jnp.concatenate([W0[None], Ws], axis=0)


def _gdpp_knobs(step_size, gamma, dtype):
  _check_gdpp(step_size, gamma)
  return jnp.asarray(step_size, dtype), jnp.asarray(gamma, dtype)


@functools.partial(jax.jit, static_argnames="steps")
def _gdpp_loop(X, Y, X_query, eta, gamma, *, steps: int):
  n = X.shape[-1]
  eta, gamma = eta[..., None, None], gamma[..., None, None]

  def loop(state, _):
    Xc, Xq, R, H = state                       # inputs (context, queries), label rows (context, queries)
    Xt = jnp.swapaxes(Xc, -1, -2)
    sigma_hat, grad = Xc @ Xt / n, R @ Xt / n  # Σ̂_t and R_t X_tᵀ/n (= −the loss gradient)
    state = (Xc - gamma * sigma_hat @ Xc, Xq - gamma * sigma_hat @ Xq, R - eta * grad @ Xc,
             H - eta * grad @ Xq)
    return state, (-state[3], state[0])

  H0 = jnp.zeros(Y.shape[:-1] + X_query.shape[-1:], X.dtype)
  return jax.lax.scan(loop, (X, X_query, Y, H0), length=steps)[1]


def gdpp_readouts(X: jax.Array, Y: jax.Array, X_query: jax.Array, *, steps: int, step_size,
                  gamma) -> jax.Array:
  """GD++'s read-outs after t = 1..steps loops, by its explicit recursion (no transformer):
  [steps, batch, d_out, m], aligned with `model.loop_readouts(*gdpp_params(...), Z0, …)`.

  The state is the prompt's rows: inputs X_t (context) and X_q,t (queries), label rows R_t
  (context, R_0 = Y) and H_t (queries, H_0 = 0), with Σ̂_t = X_t X_tᵀ/n and G_t = R_t X_tᵀ/n:
    X_{t+1} = X_t − γ Σ̂_t X_t,   X_q,t+1 = X_q,t − γ Σ̂_t X_q,t,
    R_{t+1} = R_t − η G_t X_t,   H_{t+1} = H_t − η G_t X_q,t,     read-out ŷ_t = −H_t.
  step_size η > 0 and gamma γ: numbers or [batch] arrays (one per prompt).
  """
  model_lib._check_positive_int("steps", steps)
  eta, gamma = _gdpp_knobs(step_size, gamma, X.dtype)
  return _gdpp_loop(X, Y, X_query, eta, gamma, steps=steps)[0]


def gdpp_inputs(X: jax.Array, *, steps: int, gamma) -> jax.Array:
  """The context inputs X_t of GD++'s recursion (`gdpp_readouts`) for t = 0..steps:
  [steps + 1, batch, d, n].  Σ̂_{t+1} = (I − γΣ̂_t) Σ̂_t (I − γΣ̂_t): eigenvalues λ ↦ λ(1 − γλ)²."""
  model_lib._check_positive_int("steps", steps)
  _, gamma = _gdpp_knobs(1.0, gamma, X.dtype)  # no label rows, no queries: only the x-rows
  Xs = _gdpp_loop(X, X[..., :0, :], X[..., :0], jnp.ones((), X.dtype), gamma, steps=steps)[1]
  return jnp.concatenate([X[None], Xs], axis=0)


def gdpp_filters(lam: jax.Array, *, steps: int, step_size, gamma) -> tuple[jax.Array, jax.Array]:
  """GD++ in Σ̂'s eigenbasis: (g_t(λ), e_t(λ)) for t = 0..steps, each [steps + 1, *lam.shape].

  Every matrix of the recursion is a polynomial in Σ̂ = V diag(λ) Vᵀ, so with X_t = C_t X,
  C_t = V diag(c_t) Vᵀ, the weights on the *raw* inputs are W_t = b V diag(g_t) Vᵀ (b = Y Xᵀ/n;
  ŷ_t = W_t x_q) and W_t − W_LS = (W_0 − W_LS) V diag(e_t) Vᵀ, from c_0 = e_0 = 1, g_0 = 0:
    g_{t+1} = g_t + η c_t² e_t,   e_{t+1} = e_t (1 − η λ c_t²),   c_{t+1} = c_t (1 − γ λ c_t²)
  (μ_t = λ c_t² is the eigenvalue of Σ̂_t; e_t = 1 − λ g_t, kept apart so that nothing cancels
  and λ = 0 is exact: g_t = tη).  lam: [..., d]; step_size, gamma: numbers or arrays that
  broadcast against lam[..., 0] (one per prompt).
  """
  model_lib._check_positive_int("steps", steps)
  eta, gamma = _gdpp_knobs(step_size, gamma, lam.dtype)
  return _filters(lam, eta[..., None], gamma[..., None], steps=steps)


def _filters(lam, eta, gamma, *, steps: int):
  def loop(carry, _):
    g, e, c = carry
    c2 = c * c
    carry = (g + eta * c2 * e, e * (1 - eta * lam * c2), c * (1 - gamma * lam * c2))
    return carry, carry[:2]

  one = jnp.ones(jnp.broadcast_shapes(lam.shape, eta.shape, gamma.shape), lam.dtype)
  g, e = jax.lax.scan(loop, (0 * one, one, one), length=steps)[1]
  return jnp.concatenate([0 * one[None], g]), jnp.concatenate([one[None], e])


def spectral_basis(X, Y, X_query=None):
  """(λ [batch, d] ≥ 0, V [batch, d, d], b V [batch, d_out, d], Vᵀ X_query [batch, d, m] or None)
  of Σ̂ = V diag(λ) Vᵀ: all that GD++ (`gdpp_filters`) needs of a prompt."""
  sigma_hat, b = sufficient_statistics(X, Y)
  lam, V = jnp.linalg.eigh(sigma_hat)
  beta = None if X_query is None else jnp.swapaxes(V, -1, -2) @ X_query
  return jnp.maximum(lam, 0.0), V, b @ V, beta


def gdpp_iterates(X: jax.Array, Y: jax.Array, *, steps: int, step_size, gamma) -> jax.Array:
  """GD++'s weights on the raw inputs, W_t = b V diag(g_t) Vᵀ (`gdpp_filters`), t = 0..steps:
  [steps + 1, batch, d_out, d].  W_t @ X_query is `gdpp_readouts`'s entry t − 1 (t ≥ 1);
  step_size, gamma: numbers or [batch] arrays."""
  model_lib._check_positive_int("steps", steps)
  lam, V, alpha, _ = spectral_basis(X, Y)
  g = gdpp_filters(lam, steps=steps, step_size=step_size, gamma=gamma)[0]    # [steps + 1, batch, d]
  return (alpha * g[..., None, :]) @ jnp.swapaxes(V, -1, -2)


def least_squares(X: jax.Array, Y: jax.Array) -> jax.Array:
  """Minimum-norm least squares W = Y X⁺: [batch, d_out, d] (the fixed point GD converges to)."""
  return Y @ jnp.linalg.pinv(X)


def ridge(X: jax.Array, Y: jax.Array, regularization) -> jax.Array:
  """argmin_W (1/2n)||W X − Y||² + (λ/2)||W||² = (Y Xᵀ/n)(Σ̂ + λ I)⁻¹: [batch, d_out, d]."""
  d, n = X.shape[-2], X.shape[-1]
  lam = jnp.asarray(regularization, X.dtype)
  lhs = empirical_covariance(X) + lam[..., None, None] * jnp.eye(d, dtype=X.dtype)
  rhs = Y @ jnp.swapaxes(X, -1, -2) / n
  # Solve W lhs = rhs via lhsᵀ Wᵀ = rhsᵀ (lhs is symmetric).
  return jnp.swapaxes(jnp.linalg.solve(lhs, jnp.swapaxes(rhs, -1, -2)), -1, -2)


def covariance_extremes(X: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(λ_min, λ_max) of Σ̂ per prompt: two [batch] arrays (λ_min = 0 when n < d)."""
  eig = jnp.linalg.eigvalsh(empirical_covariance(X))
  return jnp.maximum(eig[..., 0], 0.0), eig[..., -1]


def kappa_hat(X: jax.Array) -> jax.Array:
  """κ̂ = λ_max / λ_min of Σ̂ per prompt: [batch] (inf when Σ̂ is singular)."""
  lo, hi = covariance_extremes(X)
  return jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.0), jnp.inf)


def optimal_step_size(X: jax.Array) -> jax.Array:
  """Per-prompt optimal constant step η* = 2 / (λ_max + λ_min) of Σ̂: [batch]."""
  lo, hi = covariance_extremes(X)
  return 2.0 / (hi + lo)


def convergence_rate(kappa, step: str = "optimal"):
  """Per-step contraction of GD on a problem with condition number κ̂ (docs/theory.md §3).

  step="optimal" (η = 2/(λ_max+λ_min)): (κ̂ − 1)/(κ̂ + 1);  step="inverse_max" (η = 1/λ_max): 1 − 1/κ̂.
  """
  kappa = jnp.asarray(kappa)
  if step == "optimal":
    return (kappa - 1.0) / (kappa + 1.0)
  if step == "inverse_max":
    return 1.0 - 1.0 / kappa
  raise ValueError(f"step={step!r} is invalid; allowed: optimal | inverse_max")


def rate_bound(kappa, steps: int, step: str = "optimal") -> jax.Array:
  """The theory line ρ(κ̂)^t for t = 0..steps: [steps + 1, *kappa.shape].

  ||W_t − W_LS||_F ≤ ρ^t ||W_0 − W_LS||_F, so relative weight error ≤ ρ^t and a squared error
  ≤ ρ^{2t} times its value at t = 0.
  """
  t = jnp.arange(steps + 1).reshape((-1,) + (1,) * jnp.ndim(kappa))
  return convergence_rate(kappa, step) ** t


def gd_error_bound(X: jax.Array, Y: jax.Array, *, steps: int, step_size) -> jax.Array:
  """Per-prompt bound on ||W_t − W_LS||_F for GD with step η, t = 0..steps: [steps + 1, batch].

  W_t − W_LS = (W_0 − W_LS)(I − η Σ̂)^t and W_LS lies in the row space of X, so the contraction
  is ρ = max over the non-zero eigenvalues λ of Σ̂ of |1 − η λ|.
  """
  eig = jnp.linalg.eigvalsh(empirical_covariance(X))              # [batch, d]
  positive = eig > 1e-10 * eig[..., -1:]
  rho = jnp.max(jnp.where(positive, jnp.abs(1.0 - step_size * eig), 0.0), axis=-1)
  initial = jnp.linalg.norm(least_squares(X, Y), axis=(-2, -1))
  t = jnp.arange(steps + 1)[:, None]
  return rho[None] ** t * initial[None]


@functools.partial(jax.jit, static_argnames="steps")
def gd_query_error(X, Y, X_query, targets, *, steps: int, step_sizes: jax.Array) -> jax.Array:
  """Mean query MSE over the batch after `steps` GD steps, for each step size: [len(step_sizes)].

  Non-finite errors (divergence) are reported as +inf so that a search never picks them.
  """
  def error(eta):
    W_T = gd_iterates(X, Y, steps=steps, step_size=eta)[-1]
    err = jnp.mean(jnp.square(W_T @ X_query - targets))
    return jnp.where(jnp.isfinite(err), err, jnp.inf)
  return jax.lax.map(error, jnp.asarray(step_sizes, X.dtype))


def zoom_minimize(errors_of, grid, *, done, refine) -> tuple[float, float]:
  """The grid point of least error, zoomed: the one search behind every tuned baseline knob.

  errors_of(grid) -> errors (numpy, +inf where non-finite); after each round the bracket of the
  best point's neighbours (lo, best, hi) either satisfies done(lo, best, hi) and the best point
  is returned, or becomes the next grid refine(lo, hi).  A non-finite best error stops at once.
  Returns (argmin, min error) as Python floats.
  """
  return zoom_minimize_many(lambda grids: {0: errors_of(grids[0])}, {0: grid},
                            done=done, refine=refine)[0]


def zoom_minimize_many(errors_of, grids: dict, *, done, refine) -> dict:
  """`zoom_minimize` for several searches at once, so that one call can evaluate them all.

  grids: {key: first grid}; errors_of({key: grid}) -> {key: errors}, called once per round with
  the grids of the searches still zooming.  Returns {key: (argmin, min error)}.
  """
  best = {}
  grids = {k: np.asarray(g) for k, g in grids.items()}
  while grids:
    errors, zoom = errors_of(grids), {}
    for k, grid in grids.items():
      e = np.asarray(errors[k])
      i = int(np.argmin(e))
      lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
      best[k] = (float(grid[i]), float(e[i]))
      if not (done(lo, grid[i], hi) or not np.isfinite(e[i])):
        zoom[k] = np.asarray(refine(lo, hi))
    grids = zoom
  return best


def best_constant_step(X, Y, X_query, targets, *, steps: int, rel_tol: float = 1e-4,
                       grid_points: int = 48) -> tuple[float, float]:
  """The constant step η minimizing the batch-mean query MSE after `steps` GD steps.

  The error has a cliff just past the optimum (a single prompt starts to diverge), so a coarse
  grid misstates it: a log grid over [1e-4·η_hi, η_hi] (η_hi = 4 / min_prompt λ_max, past which
  every prompt diverges) is zoomed around its best point until the bracket is narrower than
  `rel_tol`·η — far finer than the 3 significant digits a baseline needs.
  Returns (η, error at η) as Python floats.
  """
  grid, rule = _step_search(X, grid_points, rel_tol)
  return zoom_minimize(
      lambda grid: gd_query_error(X, Y, X_query, targets, steps=steps, step_sizes=grid), grid, **rule)


_ZOOM_POINTS = 17


def _step_search(X, grid_points: int, rel_tol: float) -> tuple[np.ndarray, dict]:
  """The best-constant-step search: its first grid, a log grid over [1e-4·η_hi, η_hi], and its
  zoom rule (done, refine) for `zoom_minimize`: _ZOOM_POINTS across the best point's bracket until
  the bracket is narrower than rel_tol·η."""
  _, lam_max = covariance_extremes(X)
  hi = 4.0 / float(jnp.min(lam_max))
  return np.geomspace(1e-4 * hi, hi, grid_points), dict(
      done=lambda lo, best, hi: hi - lo <= rel_tol * best,
      refine=lambda lo, hi: np.linspace(lo, hi, _ZOOM_POINTS))
