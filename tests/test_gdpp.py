"""GD++ (docs/theory.md §8): the looped construction, its explicit recursion, its closed form and
its tuning, against independent numpy float64 code (tests/numpy_reference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl.linear import algorithms, baselines, construction, model as model_lib, tasks
from tests import numpy_reference as ref


def _prompts(d, d_out, n, batch=8, m=1, seed=0, condition_number=1.0, noise_std=0.1, scale=None):
  """Numpy float64 prompts: x ~ N(0, Σ) (Σ's spectrum from `tasks`, a random rotation), targets
  W* x_q; scale: [batch] factors on each prompt's inputs (a prompt far out in the tail)."""
  rng = np.random.default_rng(seed)
  c = tasks.default_config()
  c.d, c.d_out, c.n_context, c.condition_number = d, d_out, n, condition_number
  root = np.linalg.qr(rng.standard_normal((d, d)))[0] * np.sqrt(tasks.covariance_spectrum(c))
  W_star = rng.standard_normal((batch, d_out, d)) / np.sqrt(d)
  X, Xq = root @ rng.standard_normal((batch, d, n)), root @ rng.standard_normal((batch, d, m))
  if scale is not None:
    X = X * np.reshape(scale, (-1, 1, 1))
  Y = W_star @ X + noise_std * rng.standard_normal((batch, d_out, n))
  Z0 = np.concatenate([np.concatenate([X, Xq], -1), np.concatenate([Y, 0 * W_star @ Xq], -1)], -2)
  return X, Y, Xq, W_star @ Xq, Z0


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _mse(readouts, targets):
  return float(np.mean((np.asarray(readouts) - targets) ** 2))


@pytest.mark.parametrize("gamma,eta", [(0.0, 0.5), (0.2, 0.8), (0.45, 2.5), (-0.1, 0.3)])
def test_transformer_equals_recursion_closed_form_and_numpy(gamma, eta):
  """gdpp_params through the looped transformer = the explicit recursion = the eigenbasis closed
  form = numpy's recursion = numpy's textbook loop, at every loop (the overshooting γ = 0.45,
  η = 2.5 included); and it is the whitening construction with pq = γ."""
  d, d_out, m, n, T = 4, 2, 3, 12, 6
  X, Y, Xq, _, Z0 = _prompts(d, d_out, n, m=m, condition_number=5.0, seed=1)
  with jax.enable_x64(True):
    P, Q = construction.gdpp_params(d, d_out, step_size=eta, gamma=gamma)
    model = model_lib.loop_readouts(P, Q, jnp.asarray(Z0), loops=T, d_out=d_out, n_queries=m)
    explicit = construction.gdpp_readouts(X, Y, Xq, steps=T, step_size=eta, gamma=gamma)
    closed = construction.gdpp_iterates(X, Y, steps=T, step_size=eta, gamma=gamma)
    Pw, Qw = algorithms.whitened_gd_weights(d, d_out, p=gamma / eta, q=eta, step_size=eta)
  P_np = np.diag(np.r_[np.full(d, gamma / eta), np.ones(d_out)])
  Q_np = np.diag(np.r_[np.full(d, -eta), np.zeros(d_out)])
  assert np.array_equal(P, P_np) and np.array_equal(Q, Q_np)
  assert np.array_equal(P, Pw) and np.array_equal(Q, Qw)
  numpy_readouts, _ = ref.gdpp(X, Y, Xq, T, eta, gamma)
  textbook, _ = ref.looped_transformer_textbook(P_np, Q_np, Z0, T, m, d_out)
  assert explicit.shape == model.shape == (T, 8, d_out, m) and np.all(np.asarray(closed[0]) == 0)
  for name, got in (("transformer", model), ("explicit", explicit),
                    ("closed form", np.asarray(closed[1:]) @ Xq), ("textbook", textbook)):
    assert _rel(got, numpy_readouts) <= 1e-10, name


def test_gamma_zero_is_gd():
  """γ = 0: the weights are gd_params' bit for bit, the read-outs and iterates GD's to 1e-12."""
  d, T, eta = 5, 7, 0.6
  X, Y, Xq, _, _ = _prompts(d, 2, 10, m=3, seed=2)
  with jax.enable_x64(True):
    pp = construction.gdpp_params(d, 2, step_size=eta, gamma=0.0)
    gd = construction.gd_params(d, 2, step_size=eta)
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(pp, gd))
    W = ref.preconditioned_gd(X, Y, eta * np.eye(d), T)
    readouts = construction.gdpp_readouts(X, Y, Xq, steps=T, step_size=eta, gamma=0.0)
    assert _rel(readouts, W[1:] @ Xq) <= 1e-12
    assert _rel(construction.gdpp_iterates(X, Y, steps=T, step_size=eta, gamma=0.0), W) <= 1e-12


def test_spectrum_map_and_its_equalising_gamma():
  """One loop maps Σ̂'s eigenvalues λ ↦ λ(1 − γλ)² with the same eigenvectors (float64
  precision), also past the monotone range γλ_max ≤ 1/3; γ* = 1/(λ_max + √(λ_max λ_min) + λ_min)
  equalises the two ends and minimises the condition number over the interval [λ_min, λ_max],
  4(κ̂ + √κ̂ + 1)³ / (27(κ̂ + √κ̂)²)."""
  X = _prompts(6, 1, 20, batch=1, condition_number=10.0, seed=3)[0]
  lam, V = np.linalg.eigh(X[0] @ X[0].T / 20)
  lo, hi = lam[0], lam[-1]
  with jax.enable_x64(True):
    for u in (0.1, 1 / 3, 0.8):
      gamma = u / hi
      X1 = np.asarray(construction.gdpp_inputs(X, steps=1, gamma=gamma))[1, 0]
      new = X1 @ X1.T / 20
      mapped = lam * (1 - gamma * lam) ** 2
      assert np.max(np.abs(np.linalg.eigvalsh(new) - np.sort(mapped))) <= 1e-13 * hi, u
      assert np.max(np.abs(new @ V - V * mapped)) <= 1e-13 * hi, u       # the same eigenvectors
  f = lambda g, x: x * (1 - g * x) ** 2
  g_star = 1 / (hi + np.sqrt(hi * lo) + lo)
  assert f(g_star, hi) == pytest.approx(f(g_star, lo), rel=1e-12)
  grid = np.linspace(lo, hi, 200_001)
  kappa_after = lambda g: f(g, grid).max() / f(g, grid).min()
  k, s = hi / lo, np.sqrt(hi / lo)
  assert kappa_after(g_star) == pytest.approx(4 * (k + s + 1) ** 3 / (27 * (k + s) ** 2), rel=1e-8)
  others = [kappa_after(g) for g in np.linspace(0, 0.99 / hi, 100)]
  assert min(others) >= kappa_after(g_star) * (1 - 1e-9) and kappa_after(g_star) < k / 2
  # In the monotone range the ends stay the ends: κ̂ ↦ κ̂·((1 − γλ_max)/(1 − γλ_min))².
  g = 1 / (3 * hi)
  assert kappa_after(g) == pytest.approx(k * ((1 - g * hi) / (1 - g * lo)) ** 2, rel=1e-12)


def test_tuned_gdpp_is_at_least_tuned_gd_on_the_same_prompts():
  """fit_gdpp's (γ, η), recomputed in numpy on the tuning prompts, is ≤ the tuned constant-step
  GD recomputed in numpy — and much better when Σ is anisotropic (whitening pays)."""
  d, T = 4, 4
  X, Y, Xq, targets, _ = _prompts(d, 1, 12, batch=256, condition_number=10.0, seed=4)
  with jax.enable_x64(True):
    gamma, eta, err = baselines.fit_gdpp(X, Y, Xq, targets, steps=T)
    eta_gd, _ = construction.best_constant_step(X, Y, Xq, targets, steps=T)
  gdpp_err = _mse(ref.gdpp(X, Y, Xq, T, eta, gamma)[0][-1], targets)
  gd_err = _mse(ref.preconditioned_gd(X, Y, eta_gd * np.eye(d), T)[-1] @ Xq, targets)
  assert err == pytest.approx(gdpp_err, rel=1e-10)
  assert gdpp_err <= gd_err * (1 + 1e-12)
  assert gamma > 0 and gdpp_err < 0.5 * gd_err


def test_fit_survives_diverging_prompts():
  """A prompt 30× out in the tail diverges at most of the grid (its mean is +inf there, never
  NaN): the fit is finite and is its numpy error."""
  d, T = 4, 4
  scale = np.ones(256)
  scale[5] = 30.0
  X, Y, Xq, targets, _ = _prompts(d, 1, 12, batch=256, condition_number=10.0, seed=4, scale=scale)
  with jax.enable_x64(True):
    gamma, eta, err = baselines.fit_gdpp(X, Y, Xq, targets, steps=T)
    lam, _, alpha, beta = construction.spectral_basis(X, Y, Xq)
    far = baselines._gdpp_errors(lam, alpha, beta, targets, jnp.array([0.0, 1e3, 1e30]),
                                  jnp.array([eta, 1e3, 1.0]), steps=T)
    raw = construction.gdpp_filters(lam, steps=T, step_size=1.0, gamma=1e30)[0][-1]
  assert np.isnan(raw).any()                                          # what the search must not see
  assert np.isfinite(far[0]) and np.all(np.isposinf(far[1:]))
  assert np.isfinite([gamma, eta, err]).all()
  assert err == pytest.approx(_mse(ref.gdpp(X, Y, Xq, T, eta, gamma)[0][-1], targets), rel=1e-10)


def test_oracle_per_prompt_against_its_grid_and_gd():
  """Each prompt's oracle (γ_i, η_i) is at least as good, in its worst eigen-direction factor
  max_j |e_T(λ_j)| recomputed in numpy, as the best point of its first grid (the zoom only
  improves) and beats GD's per-prompt optimal rate ((κ̂−1)/(κ̂+1))^T; scaling the inputs by s
  scales the knobs by 1/s².  (A local search: on a 100× denser grid some prompts do up to ~2×
  better — the landscape has many basins.)"""
  d, T = 4, 5
  X = _prompts(d, 1, 16, batch=6, condition_number=4.0, seed=6)[0]
  with jax.enable_x64(True):
    gamma, eta = (np.asarray(a) for a in baselines.gdpp_oracle(jnp.asarray(X), steps=T))
    scaled = [np.asarray(a) for a in baselines.gdpp_oracle(jnp.asarray(3 * X), steps=T)]
  np.testing.assert_allclose(scaled, [gamma / 9, eta / 9], rtol=1e-9)
  lam = np.linalg.eigvalsh(X @ np.swapaxes(X, 1, 2) / 16)

  def worst(g, e, lam):  # numpy: max_j |Π_t (1 − η μ_t)|, μ_{t+1} = μ_t (1 − γ μ_t)²
    mu, prod = lam.copy(), np.ones_like(lam)
    for _ in range(T):
      prod, mu = prod * (1 - e * mu), mu * (1 - g * mu) ** 2
    return np.max(np.abs(prod), axis=-1)

  U, W = np.meshgrid(np.linspace(0, 1.5, 31), np.geomspace(0.25, 32, 43), indexing="ij")
  for i in range(len(X)):
    top = lam[i, -1]
    first_grid = worst(U.ravel()[:, None] / top, W.ravel()[:, None] / top, lam[i][None]).min()
    mine = worst(gamma[i], eta[i], lam[i])
    kappa = top / lam[i, 0]
    assert mine <= first_grid * (1 + 1e-9) and mine < ((kappa - 1) / (kappa + 1)) ** T, i
