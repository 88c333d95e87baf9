"""The reference algorithms of loopicl/linear/algorithms.py against independent numpy float64 code."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl.linear import algorithms, construction, model as model_lib, tasks
from tests import numpy_reference as ref


def _task(d, d_out, n, condition_number=1.0):
  c = tasks.default_config()
  c.d, c.d_out, c.n_context, c.condition_number = d, d_out, n, condition_number
  return c


class _Prompts(NamedTuple):
  X: np.ndarray
  Y: np.ndarray
  X_query: np.ndarray
  targets: np.ndarray
  Z0: np.ndarray


def _prompts(d, d_out, n, batch=8, m=1, seed=0, condition_number=1.0, noise_std=0.1):
  """Numpy float64 prompts of the task distribution (x ~ N(0, Σ), Σ's spectrum from `tasks`)."""
  rng = np.random.default_rng(seed)
  U = np.linalg.qr(rng.standard_normal((d, d)))[0]
  root = U * np.sqrt(tasks.covariance_spectrum(_task(d, d_out, n, condition_number)))
  W_star = rng.standard_normal((batch, d_out, d)) / np.sqrt(d)
  X, Xq = root @ rng.standard_normal((batch, d, n)), root @ rng.standard_normal((batch, d, m))
  Y = W_star @ X + noise_std * rng.standard_normal((batch, d_out, n))
  Z0 = np.concatenate([np.concatenate([X, Xq], -1),
                       np.concatenate([Y, np.zeros((batch, d_out, m))], -1)], -2)
  return _Prompts(X, Y, Xq, W_star @ Xq, Z0)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _cov(X):
  X = np.asarray(X, np.float64)
  return X @ np.swapaxes(X, -1, -2) / X.shape[-1]


def _rhs(X, Y):
  X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
  return Y @ np.swapaxes(X, -1, -2) / X.shape[-1]


def _lstsq(X, Y):
  return np.stack([np.linalg.lstsq(x.T, y.T, rcond=None)[0].T for x, y in zip(np.asarray(X), np.asarray(Y))])


def _sigma_norm(E, S):
  """||E||_Σ̂ = sqrt(tr(E Σ̂ Eᵀ)) per prompt: E [..., batch, d_out, d] -> [..., batch]."""
  return np.sqrt(np.einsum("...bod,bde,...boe->...b", E, S, E))


# ---- numpy references: textbook forms, one prompt (and one output row) at a time ----

def np_cg(X, Y, steps):
  S, B = _cov(X), _rhs(X, Y)
  out = np.zeros((steps + 1,) + B.shape)
  for i in range(B.shape[0]):
    for o in range(B.shape[1]):
      A, c = S[i], B[i, o]
      x, r = np.zeros_like(c), c.copy()
      p = r.copy()
      for t in range(1, steps + 1):
        rr = r @ r
        if rr > 0:
          Ap = A @ p
          alpha = rr / (p @ Ap)
          x, r = x + alpha * p, r - alpha * Ap
          p = r + (r @ r) / rr * p
        out[t, i, o] = x
  return out


def np_chebyshev(X, Y, steps, lo, hi):
  """Golub–Varga: x_{k+1} = x_{k−1} + ω_{k+1}(x_k − x_{k−1} + r_k/θ), ρ = δ/θ,
  ω_1 = 1, ω_2 = 1/(1 − ρ²/2), ω_{k+1} = 1/(1 − ρ²ω_k/4)."""
  S, B = _cov(X), _rhs(X, Y)
  lo, hi = np.broadcast_to(lo, B.shape[:1]), np.broadcast_to(hi, B.shape[:1])
  out = np.zeros((steps + 1,) + B.shape)
  for i in range(B.shape[0]):
    theta, delta = (hi[i] + lo[i]) / 2, (hi[i] - lo[i]) / 2
    rho = delta / theta
    prev, x, omega = np.zeros_like(B[i]), np.zeros_like(B[i]), 1.0
    for k in range(steps):
      if k == 1:
        omega = 1 / (1 - rho ** 2 / 2)
      elif k > 1:
        omega = 1 / (1 - rho ** 2 * omega / 4)
      prev, x = x, prev + omega * (x - prev + (B[i] - x @ S[i]) / theta)
      out[k + 1, i] = x
  return out


def np_newton_schulz(X, Y, steps, alpha):
  S, B = _cov(X), _rhs(X, Y)
  out = np.zeros((steps + 1,) + B.shape)
  for i in range(B.shape[0]):
    M = alpha[i] * np.eye(S.shape[-1])
    out[0, i] = B[i] @ M
    for k in range(steps):
      M = M @ (2 * np.eye(S.shape[-1]) - S[i] @ M)
      out[k + 1, i] = B[i] @ M
  return out


def np_whitened_predictions(X, Y, Xq, steps, pq, eta):
  """The loop on explicit blocks: X_all ← X_all − (pq/n) X Xᵀ X_all, R_all ← R_all − (η/n) R Xᵀ X_all."""
  X, Y, Xq = (np.asarray(v, np.float64) for v in (X, Y, Xq))
  n = X.shape[-1]
  Xall, R = np.concatenate([X, Xq], -1), np.concatenate([Y, np.zeros(Y.shape[:2] + Xq.shape[-1:])], -1)
  out = [np.zeros(Y.shape[:2] + Xq.shape[-1:])]
  for _ in range(steps):
    Xc, Rc = Xall[..., :n], R[..., :n]
    Xall, R = (Xall - pq / n * Xc @ np.swapaxes(Xc, 1, 2) @ Xall,
               R - eta / n * Rc @ np.swapaxes(Xc, 1, 2) @ Xall)
    out.append(-R[..., n:])
  return np.stack(out)


# ---- conjugate gradients ----

def test_cg_matches_numpy_every_step_and_least_squares_at_d():
  d, T = 5, 8
  with jax.enable_x64(True):
    b = _prompts(d, 2, 11, condition_number=10.0)
    W = algorithms.conjugate_gradient_iterates(b.X, b.Y, steps=T)
    assert W.shape == (T + 1, 8, 2, d) and W.dtype == jnp.float64
    expected = np_cg(b.X, b.Y, T)
    for t in range(T + 1):
      assert _rel(W[t], expected[t]) <= 1e-8, t
    assert _rel(W[d], _lstsq(b.X, b.Y)) <= 1e-8


def test_cg_is_the_best_krylov_method_in_the_sigma_norm():
  d, T = 6, 6
  with jax.enable_x64(True):
    b = _prompts(d, 1, 12, batch=16, condition_number=20.0, seed=3)
    S, W_ls = _cov(b.X), _lstsq(b.X, b.Y)
    err = lambda W: _sigma_norm(np.asarray(W) - W_ls, S)
    cg = err(algorithms.conjugate_gradient_iterates(b.X, b.Y, steps=T))
    gd = err(construction.gd_iterates(b.X, b.Y, steps=T, step_size=construction.optimal_step_size(b.X)))
    lo, hi = construction.covariance_extremes(b.X)
    cheb = err(algorithms.chebyshev_iterates(b.X, b.Y, steps=T, lam_min=lo, lam_max=hi))
    assert np.all(cg <= gd * (1 + 1e-9) + 1e-12) and np.all(cg <= cheb * (1 + 1e-9) + 1e-12)


def test_cg_keeps_converged_rows_without_nan():
  """Y = 0 (W_0 = 0 is the solution) and Σ̂ = I exactly (converged after one step, residual 0)."""
  d, n, T = 4, 8, 6
  with jax.enable_x64(True):
    X = np.concatenate([np.sqrt(n / 2) * np.eye(d)] * 2, axis=-1)[None]     # Σ̂ = I exactly
    rng = np.random.default_rng(0)
    X = np.concatenate([X, X, rng.standard_normal((1, d, n))])
    Y = rng.standard_normal((3, 2, n))
    Y[0] = 0
    W = np.asarray(algorithms.conjugate_gradient_iterates(jnp.asarray(X), jnp.asarray(Y), steps=T))
    assert np.all(np.isfinite(W))
    assert np.all(W[:, 0] == 0)                      # rr = 0 from the start: 0/0 at every step
    assert _rel(W[1:, 1], np.broadcast_to(_rhs(X, Y)[1], W[1:, 1].shape)) <= 1e-14  # W_1 = b = W_LS
    assert np.all(W[3:, 1] == W[2, 1])               # the residual is exactly 0 by then: kept
    assert _rel(W[d:, 2], np.broadcast_to(_lstsq(X, Y)[2], W[d:, 2].shape)) <= 1e-8
  W32 = algorithms.conjugate_gradient_iterates(jnp.asarray(X, jnp.float32),
                                               jnp.asarray(Y, jnp.float32), steps=3 * d)
  assert W32.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(W32)))


# ---- Chebyshev ----

def test_chebyshev_matches_numpy_fixed_and_oracle_bounds():
  d, T = 5, 10
  with jax.enable_x64(True):
    b = _prompts(d, 2, 20, condition_number=4.0, seed=1)
    lo, hi = algorithms.marchenko_pastur_edges(_task(d, 2, 20, condition_number=4.0))
    W = algorithms.chebyshev_iterates(b.X, b.Y, steps=T, lam_min=lo, lam_max=hi)
    assert W.shape == (T + 1, 8, 2, d)
    assert _rel(W, np_chebyshev(b.X, b.Y, T, lo, hi)) <= 1e-10
    eig = np.linalg.eigvalsh(_cov(b.X))
    W = algorithms.chebyshev_iterates(b.X, b.Y, steps=T, lam_min=eig[:, 0], lam_max=eig[:, -1])
    assert _rel(W, np_chebyshev(b.X, b.Y, T, eig[:, 0], eig[:, -1])) <= 1e-10
    # λ₋ = λ₊: GD with the exact step 1/λ (no division by δ = 0).
    W = algorithms.chebyshev_iterates(b.X, b.Y, steps=3, lam_min=2.0, lam_max=2.0)
    assert _rel(W, ref.preconditioned_gd(b.X, b.Y, 0.5 * np.eye(d), 3)) <= 1e-12


@pytest.mark.parametrize("widen", [1.0, 1.5])
def test_chebyshev_error_within_polynomial_bound(widen):
  d, T = 6, 12
  with jax.enable_x64(True):
    b = _prompts(d, 1, 18, batch=16, condition_number=10.0, seed=2)
    S, W_ls = _cov(b.X), _lstsq(b.X, b.Y)
    eig = np.linalg.eigvalsh(S)
    lo, hi = eig[:, 0] / widen, eig[:, -1] * widen                  # every spectrum inside
    W = np.asarray(algorithms.chebyshev_iterates(b.X, b.Y, steps=T, lam_min=lo, lam_max=hi))
    rel_err = _sigma_norm(W - W_ls, S) / _sigma_norm(W_ls, S)         # [T + 1, batch]
    bound = 1 / np.cosh(np.arange(T + 1)[:, None] * np.arccosh((hi + lo) / (hi - lo)))
    assert np.all(rel_err <= bound * (1 + 1e-8) + 1e-12)
    assert np.any(rel_err[T] >= 0.1 * bound[T])                      # not vacuous
    assert _rel(algorithms.chebyshev_factor(lo, hi, T), bound) <= 1e-10


def test_marchenko_pastur_edges():
  lo, hi = algorithms.marchenko_pastur_edges(_task(4, 1, 16, condition_number=10.0))
  assert np.isclose(hi, 1.5 ** 2) and np.isclose(lo, 0.1 * 0.5 ** 2)
  lo, hi = algorithms.marchenko_pastur_edges(_task(4, 1, 4))            # n = d: the floor
  assert hi == 4.0 and lo == 1e-3 * 4.0
  lo, hi = algorithms.marchenko_pastur_edges(_task(4, 1, 1), floor=1e-2)  # n < d: non-zero part
  assert np.isclose(hi, 9.0) and np.isclose(lo, 1.0)


# ---- Newton–Schulz ----

def test_newton_schulz_matches_numpy_and_squares_its_error():
  d, K = 5, 6
  with jax.enable_x64(True):
    b = _prompts(d, 1, 20, condition_number=8.0, seed=4)
    S = _cov(b.X)
    alpha = 1 / np.linalg.norm(S, axis=(-2, -1))
    W = algorithms.newton_schulz_iterates(b.X, b.Y, steps=K)
    assert W.shape == (K + 1, 8, 1, d)
    assert _rel(W, np_newton_schulz(b.X, b.Y, K, alpha)) <= 1e-10
    # With Y = X, b = Σ̂ and W_k = Σ̂ M_k: the error e_k = ||I − Σ̂M_k||₂ squares each step.
    SM = np.asarray(algorithms.newton_schulz_iterates(b.X, b.X, steps=K))
    e = np.linalg.norm(np.eye(d) - SM, ord=2, axis=(-2, -1))          # [K + 1, batch]
    assert np.all(e[0] < 1)
    assert np.all(np.abs(e[1:] - e[:-1] ** 2) <= 1e-12 + 1e-10 * e[:-1] ** 2)
    assert _rel(e[-1], e[0] ** (2 ** K)) <= 1e-8


@pytest.mark.parametrize("n,scale", [(20, None), (20, "optimal"), (3, None)])
def test_newton_step_k_is_gd_step_two_to_the_k(n, scale):
  d, K = 5, 5
  with jax.enable_x64(True):
    b = _prompts(d, 2, n, condition_number=4.0, seed=5)
    S = _cov(b.X)
    if scale is None:
      alpha = 1 / np.linalg.norm(S, axis=(-2, -1))
    else:
      eig = np.linalg.eigvalsh(S)
      scale = alpha = 2 / (eig[:, 0] + eig[:, -1])
    W = np.asarray(algorithms.newton_schulz_iterates(b.X, b.Y, steps=K, scale=scale))
    gd = np.asarray(construction.gd_iterates(b.X, b.Y, steps=2 ** K, step_size=alpha))
    for k in range(K + 1):
      assert _rel(W[k], gd[2 ** k]) <= 1e-10, k


# ---- progressively whitened GD ----

@pytest.mark.parametrize("d_out,m,p,q", [(1, 1, 0.5, 0.4), (2, 3, -0.3, -0.5), (2, 4, 0.9, 0.3)])
def test_whitened_gd_is_the_looped_transformer(d_out, m, p, q):
  d, n, T, eta = 4, 12, 7, 0.6
  with jax.enable_x64(True):
    b = _prompts(d, d_out, n, m=m, condition_number=5.0, seed=6)
    pred = algorithms.whitened_gd_predictions(b.X, b.Y, b.X_query, steps=T, p=p, q=q, step_size=eta)
    assert pred.shape == (T + 1, 8, d_out, m) and np.all(np.asarray(pred[0]) == 0)
    P, Q = algorithms.whitened_gd_weights(d, d_out, p=p, q=q, step_size=eta)
    D = d + d_out
    P_np, Q_np = np.zeros((D, D)), np.zeros((D, D))
    P_np[:d, :d], P_np[d:, d:], Q_np[:d, :d] = p * np.eye(d), eta / q * np.eye(d_out), -q * np.eye(d)
    assert np.array_equal(P, P_np) and np.array_equal(Q, Q_np)
    readouts = model_lib.loop_readouts(P, Q, b.Z0, loops=T, d_out=d_out, n_queries=m)
    assert _rel(pred[1:], readouts) <= 1e-10
    textbook, states = ref.looped_transformer_textbook(P_np, Q_np, b.Z0, T, m, d_out)
    assert _rel(pred[1:], textbook) <= 1e-10
    assert _rel(pred, np_whitened_predictions(b.X, b.Y, b.X_query, T, p * q, eta)) <= 1e-10
    # The iterates act on the raw inputs: the context label rows hold Y − U_t X.
    U = np.asarray(algorithms.whitened_gd_iterates(b.X, b.Y, steps=T, p=p, q=q, step_size=eta))
    assert _rel(states[1:, :, d:, :n], np.asarray(b.Y) - U[1:] @ np.asarray(b.X)) <= 1e-10


@pytest.mark.parametrize("p,q", [(0.0, 0.7), (1.3, 0.0)])
def test_whitened_gd_without_whitening_is_plain_gd(p, q):
  d, T, eta = 5, 6, 0.4
  with jax.enable_x64(True):
    b = _prompts(d, 2, 10, m=3, seed=7)
    pred = algorithms.whitened_gd_predictions(b.X, b.Y, b.X_query, steps=T, p=p, q=q, step_size=eta)
    W = ref.preconditioned_gd(b.X, b.Y, eta * np.eye(d), T)
    assert _rel(pred, W @ np.asarray(b.X_query)) <= 1e-12


def test_fit_whitened_gd_beats_constant_step_gd():
  d, T = 4, 4
  with jax.enable_x64(True):
    b = _prompts(d, 1, 12, batch=32, condition_number=10.0, seed=8)
    prompts = (b.X, b.Y, b.X_query, b.targets)
    pq, eta, err = algorithms.fit_whitened_gd(*prompts, steps=T)
    _, gd_err = construction.best_constant_step(*prompts, steps=T)
    pred = np_whitened_predictions(b.X, b.Y, b.X_query, T, pq, eta)[-1]
    assert np.isclose(err, np.mean((pred - np.asarray(b.targets)) ** 2), rtol=1e-10)
    assert pq > 0 and err < gd_err


# ---- arguments ----

@pytest.mark.parametrize("call,name", [
    (lambda X, Y: algorithms.conjugate_gradient_iterates(X, Y, steps=0), "steps=0"),
    (lambda X, Y: algorithms.chebyshev_iterates(X, Y, steps=2, lam_min=-1.0, lam_max=1.0), "lam_min=-1.0"),
    (lambda X, Y: algorithms.chebyshev_iterates(X, Y, steps=2, lam_min=0.0, lam_max=0.0), "lam_max=0.0"),
    (lambda X, Y: algorithms.chebyshev_iterates(X, Y, steps=2, lam_min=2.0, lam_max=1.0), "lam_max=1.0"),
    (lambda X, Y: algorithms.newton_schulz_iterates(X, Y, steps=2, scale=-1.0), "scale=-1.0"),
    (lambda X, Y: algorithms.newton_schulz_iterates(X, Y, steps=1.5), "steps=1.5"),
    (lambda X, Y: algorithms.whitened_gd_iterates(X, Y, steps=2, p=float("nan"), q=1.0,
                                                  step_size=0.1), "p=nan"),
    (lambda X, Y: algorithms.whitened_gd_predictions(X, Y, X, steps=2, p=1.0, q=1.0,
                                                     step_size=0.0), "step_size=0.0"),
    (lambda X, Y: algorithms.whitened_gd_weights(3, 1, p=1.0, q=0.0, step_size=0.1), "q=0.0"),
    (lambda X, Y: algorithms.fit_whitened_gd(X, Y, X, Y, steps=2, alternations=0),
     "alternations=0"),
    (lambda X, Y: algorithms.marchenko_pastur_edges(_task(3, 1, 6), floor=2.0), "floor=2.0"),
])
def test_bad_arguments_raise_one_line_value_errors(call, name):
  b = _prompts(3, 1, 6, batch=2)
  b = b._replace(X=jnp.asarray(b.X, jnp.float32), Y=jnp.asarray(b.Y, jnp.float32))
  with pytest.raises(ValueError) as info:
    call(b.X, b.Y)
  assert name in str(info.value) and "allowed:" in str(info.value) and "\n" not in str(info.value)


def test_expected_pgd_error_is_the_mean_over_tasks_and_queries():
  """baselines.expected_pgd_error (closed form over W* and x_q) against numpy: GD steps
  W ← W + (W* − W) Σ̂ A iterated on 200 000 sampled (W*, x_q) per prompt, within 5 standard errors;
  and sample_sigma_hats is X Xᵀ/n of x ~ N(0, Σ) (its mean is Σ)."""
  from configs import default
  from loopicl.linear import baselines
  task = default.get_config().task
  task.d, task.n_context, task.condition_number, task.rotate = 3, 6, 10.0, True
  sigma = tasks.covariance(task)
  hats = baselines.sample_sigma_hats(task, 0, 20000)
  assert np.max(np.abs(hats.mean(axis=0) - sigma)) < 5 * np.max(np.sqrt(2 * np.diag(sigma) ** 2 / 6 / 20000))
  A = 0.2 * np.linalg.inv(sigma) + 0.05 * np.eye(3)
  loops = 4
  with jax.enable_x64(True):
    got = np.asarray(baselines.expected_pgd_error(jnp.asarray(A), jnp.asarray(hats[:3]),
                                                  jnp.asarray(sigma), loops))
  rng = np.random.default_rng(1)
  root = np.linalg.cholesky(sigma)
  for k in range(3):
    w_star = rng.standard_normal((200000, 3)) / np.sqrt(3)
    x_q = rng.standard_normal((200000, 3)) @ root.T
    W = np.zeros_like(w_star)
    for _ in range(loops):
      W = W + (w_star - W) @ hats[k] @ A
    err = np.sum((W - w_star) * x_q, axis=1) ** 2
    assert abs(err.mean() - got[k]) < 5 * err.std() / np.sqrt(len(err)), (k, err.mean(), got[k])
