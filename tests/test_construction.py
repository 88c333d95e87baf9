"""The GD construction, the model's two forms and the reference algorithms, against numpy float64."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopicl
from loopicl.linear import construction, model as model_lib, tasks
from tests import numpy_reference as ref


def _task(d, d_out, m, n=None, kind="linear_regression", **kw):
  c = tasks.default_config()
  c.kind, c.d, c.d_out, c.n_queries = kind, d, d_out, m
  c.n_context = 3 * d if n is None else n
  for k, v in kw.items():
    c[k] = v
  return c


def _random_spd(d, seed):
  rng = np.random.default_rng(seed)
  B = rng.standard_normal((d, d))
  A = B @ B.T / d + 0.2 * np.eye(d)
  return 0.5 * A / np.linalg.eigvalsh(A)[-1]  # spectral norm 0.5: a stable preconditioner


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


D_OUT_M_PRECOND = list(itertools.product([1, 3], [1, 4, "d"], ["step", "spd"]))


@pytest.mark.parametrize("d_out,m,precond", D_OUT_M_PRECOND)
def test_construction_readout_equals_gd_predictions(d_out, m, precond):
  d, T = 5, 12
  m = d if m == "d" else m
  with jax.enable_x64(True):
    batch = tasks.sample(jax.random.key(3), _task(d, d_out, m, noise_std=0.1), 16)
    if precond == "step":
      A = 0.4 * np.eye(d)
      gd = construction.gd_transformer(d, d_out, step_size=0.4)
    else:
      A = _random_spd(d, seed=m + d_out)
      gd = construction.gd_transformer(d, d_out, preconditioner=A)
    readouts = gd(batch.Z0, loops=T, n_queries=m)
    assert readouts.shape == (T, 16, d_out, m) and readouts.dtype == jnp.float64
    W = ref.preconditioned_gd(batch.X, batch.Y, A, T)
    for t in range(1, T + 1):
      expected = W[t] @ np.asarray(batch.X_query)
      assert _rel(readouts[t - 1], expected) <= 1e-10, t


@pytest.mark.parametrize("d_out,m", [(1, 1), (3, 4)])
def test_construction_state_rows(d_out, m):
  """Context columns hold the residual Y − W_t X, query columns −W_t x_q, top d rows frozen."""
  d, T, n = 4, 8, 9
  with jax.enable_x64(True):
    batch = tasks.sample(jax.random.key(5), _task(d, d_out, m, n=n, noise_std=0.3), 8)
    A = _random_spd(d, seed=1)
    P, Q = construction.gd_params(d, d_out, preconditioner=A)
    states = model_lib.loop_states(P, Q, batch.Z0, loops=T, n_queries=m)
    W = ref.preconditioned_gd(batch.X, batch.Y, A, T)
    Z0 = np.asarray(batch.Z0)
    for t in range(1, T + 1):
      Z = np.asarray(states[t - 1])
      assert np.array_equal(Z[:, :d], Z0[:, :d])  # the top rows never change, bit for bit
      residual = np.asarray(batch.Y) - W[t] @ np.asarray(batch.X)
      assert _rel(Z[:, d:, :n], residual) <= 1e-10
      assert _rel(Z[:, d:, n:], -W[t] @ np.asarray(batch.X_query)) <= 1e-10


@pytest.mark.parametrize("form", ["reassociated", "textbook"])
def test_fast_and_textbook_forms_match_numpy(form):
  d, d_out, m, T = 4, 2, 3, 6
  with jax.enable_x64(True):
    batch = tasks.sample(jax.random.key(0), _task(d, d_out, m, n=7), 5)
    model = loopicl.LoopedLinearTransformer(d, d_out, "full", init_scale=0.3, form=form,
                                            rngs=nnx.Rngs(1))
    P, Q = (np.asarray(w) for w in model.weights())
    expected, _ = ref.looped_transformer_textbook(P, Q, batch.Z0, T, m, d_out)
    got = model(batch.Z0, loops=T, n_queries=m)
    assert _rel(got, expected) <= 1e-12


def test_float32_matches_float64():
  d, T = 6, 10
  with jax.enable_x64(True):
    batch64 = tasks.sample(jax.random.key(2), _task(d, 1, 1), 64)
    out64 = construction.gd_transformer(d, 1, step_size=0.5)(batch64.Z0, loops=T)
  Z32 = jnp.asarray(np.asarray(batch64.Z0), jnp.float32)
  out32 = construction.gd_transformer(d, 1, step_size=0.5)(Z32, loops=T)
  assert out32.dtype == jnp.float32
  assert _rel(out32, out64) < 1e-5


def test_gd_parameterization_is_the_construction():
  d, d_out = 5, 2
  with jax.enable_x64(True):
    model = loopicl.LoopedLinearTransformer(d, d_out, "gd", init_scale=0.3, rngs=nnx.Rngs(0))
    A = _random_spd(d, 4)
    model.A[...] = jnp.asarray(A)
    batch = tasks.sample(jax.random.key(1), _task(d, d_out, 2), 4)
    W = ref.preconditioned_gd(batch.X, batch.Y, A, 3)
    got = model(batch.Z0, loops=3, n_queries=2)
    assert _rel(got[-1], W[3] @ np.asarray(batch.X_query)) <= 1e-10
    # Only A is a parameter: P is fixed.
    params = nnx.state(model, nnx.Param)
    assert [tuple(x.shape) for x in jax.tree.leaves(params)] == [(d, d)]


def test_mask_query_columns_are_independent():
  d, m = 4, 5
  model = loopicl.LoopedLinearTransformer(d, 1, "full", init_scale=0.4, rngs=nnx.Rngs(7))
  batch = tasks.sample(jax.random.key(9), _task(d, 1, m), 3)
  base = np.asarray(model(batch.Z0, loops=4, n_queries=m))
  n = batch.Z0.shape[-1] - m
  for j in range(m):
    Z = batch.Z0.at[:, :d, n + j].add(1.7)
    out = np.asarray(model(Z, loops=4, n_queries=m))
    others = [k for k in range(m) if k != j]
    assert np.array_equal(out[..., others], base[..., others])
    assert not np.allclose(out[..., j], base[..., j])


def test_gd_iterates_least_squares_ridge_against_numpy():
  d, d_out, T = 5, 2, 15
  with jax.enable_x64(True):
    b = tasks.sample(jax.random.key(4), _task(d, d_out, 1, n=12, noise_std=0.5), 6)
    X, Y = np.asarray(b.X), np.asarray(b.Y)
    W = construction.gd_iterates(b.X, b.Y, steps=T, step_size=0.3)
    assert W.shape == (T + 1, 6, d_out, d)
    assert _rel(W, ref.preconditioned_gd(X, Y, 0.3 * np.eye(d), T)) <= 1e-12
    A = _random_spd(d, 2)
    assert _rel(construction.gd_iterates(b.X, b.Y, steps=T, preconditioner=A),
                ref.preconditioned_gd(X, Y, A, T)) <= 1e-12
    W_ls = np.stack([np.linalg.lstsq(x.T, y.T, rcond=None)[0].T for x, y in zip(X, Y)])
    assert _rel(construction.least_squares(b.X, b.Y), W_ls) <= 1e-10
    lam = 0.37
    n = X.shape[-1]
    W_ridge = np.stack([y @ x.T @ np.linalg.inv(x @ x.T + n * lam * np.eye(d)) for x, y in zip(X, Y)])
    assert _rel(construction.ridge(b.X, b.Y, lam), W_ridge) <= 1e-10
    eig = np.linalg.eigvalsh(X @ np.swapaxes(X, 1, 2) / n)
    assert _rel(construction.optimal_step_size(b.X), 2 / (eig[:, 0] + eig[:, -1])) <= 1e-12
    assert _rel(construction.kappa_hat(b.X), eig[:, -1] / eig[:, 0]) <= 1e-10


@pytest.mark.parametrize("n_over_d,kappa", [(4, 1.0), (1.5, 1.0), (4, 10.0)])
def test_gd_rate_bound_holds_on_sampled_prompts(n_over_d, kappa):
  d, T = 8, 25
  with jax.enable_x64(True):
    c = _task(d, 1, 1, n=int(n_over_d * d), condition_number=kappa, rotate=True, noise_std=0.1)
    b = tasks.sample(jax.random.key(11), c, 64)
    X, Y = np.asarray(b.X), np.asarray(b.Y)
    n = X.shape[-1]
    eig = np.linalg.eigvalsh(X @ np.swapaxes(X, 1, 2) / n)
    W_ls = np.stack([np.linalg.lstsq(x.T, y.T, rcond=None)[0].T for x, y in zip(X, Y)])
    # Per-prompt optimal step: ||W_t − W_LS|| ≤ ((κ̂−1)/(κ̂+1))^t ||W_LS||.
    eta = np.asarray(construction.optimal_step_size(b.X))
    kap = np.asarray(construction.kappa_hat(b.X))
    bound = np.asarray(construction.rate_bound(kap, T))            # [T+1, batch]
    for i in range(len(X)):
      W = ref.preconditioned_gd(X[i:i + 1], Y[i:i + 1], eta[i] * np.eye(d), T)[:, 0]
      dist = np.linalg.norm(W - W_ls[i], axis=(-2, -1))
      assert np.all(dist <= bound[:, i] * np.linalg.norm(W_ls[i]) * (1 + 1e-9) + 1e-12)
    # A constant step: the package's bound dominates the numpy distance for every t and prompt.
    W = ref.preconditioned_gd(X, Y, 0.5 * np.eye(d), T)
    dist = np.linalg.norm(W - W_ls[None], axis=(-2, -1))
    pkg_bound = np.asarray(construction.gd_error_bound(b.X, b.Y, steps=T, step_size=0.5))
    assert np.all(dist <= pkg_bound * (1 + 1e-9) + 1e-12)
    # The bound is not vacuous: it is attained within a factor 10 at the last step for some prompt.
    assert np.any(dist[-1] >= 0.1 * pkg_bound[-1])


def test_best_constant_step_is_precise():
  with jax.enable_x64(True):
    b = tasks.sample(jax.random.key(1), _task(10, 1, 1, n=40), 512)
    eta, err = construction.best_constant_step(b.X, b.Y, b.X_query, b.targets, steps=20)
    X, Y, Xq, tg = (np.asarray(v) for v in (b.X, b.Y, b.X_query, b.targets))

    def np_err(e):
      W = ref.preconditioned_gd(X, Y, e * np.eye(10), 20)[-1]
      return np.mean((W @ Xq - tg) ** 2)

    assert abs(np_err(eta) - err) <= 1e-10 * err
    dense = np.linspace(0.3, 1.0, 701)  # step 0.001: a grid 25× finer than the coarse one
    best_dense = min(np_err(e) for e in dense)
    assert err <= best_dense * (1 + 1e-6)
    # 3 significant digits: moving η by 0.1% in either direction does not improve the error.
    assert err <= np_err(eta * 1.001) and err <= np_err(eta * 0.999)


@pytest.mark.parametrize("rotate", [False, True])
def test_sampler_spectrum_matches_condition_number(rotate):
  with jax.enable_x64(True):
    c = _task(6, 1, 1, n=50, condition_number=20.0, rotate=rotate)
    b = tasks.sample(jax.random.key(0), c, 4000)
    X = np.asarray(b.X).transpose(1, 0, 2).reshape(6, -1)
    sigma = X @ X.T / X.shape[1]
    eig = np.sort(np.linalg.eigvalsh(sigma))[::-1]
    np.testing.assert_allclose(eig, np.geomspace(1, 1 / 20, 6), rtol=0.03)
    off_diagonal = np.abs(sigma - np.diag(np.diag(sigma))).max()
    if rotate:
      assert off_diagonal > 0.05  # a random eigenbasis
    else:
      assert off_diagonal < 0.02
    # W* has N(0, 1/d) entries, so y has unit scale when Σ = I.
    assert abs(np.var(np.asarray(b.W_star)) - 1 / 6) < 0.01


def test_sampler_determinism_and_independence():
  c = _task(5, 2, 3, noise_std=0.1)
  a = tasks.sample(jax.random.key(0), c, 256)
  b = tasks.sample(jax.random.key(0), c, 256)
  e = tasks.sample(jax.random.key(1), c, 256)
  for x, y in zip(a, b):
    assert np.array_equal(x, y)
  corr = np.corrcoef(np.asarray(a.W_star).ravel(), np.asarray(e.W_star).ravel())[0, 1]
  assert abs(corr) < 0.1
  assert not np.allclose(a.X, e.X)
  jitted = jax.jit(lambda k: tasks.sample(k, c, 256))(jax.random.key(0))
  np.testing.assert_allclose(jitted.Z0, a.Z0, rtol=1e-5, atol=1e-5)


def test_prompt_layout_and_vector_generation():
  c = _task(4, 2, 3, n=6, kind="vector_generation", noise_std=0.0)
  b = tasks.sample(jax.random.key(0), c, 2)
  assert b.Z0.shape == (2, 6, 6 + 4)  # m = d queries
  np.testing.assert_array_equal(b.X_query[0], np.eye(4))
  np.testing.assert_array_equal(b.Z0[:, 4:, 6:], 0)
  np.testing.assert_allclose(b.targets, b.W_star, rtol=1e-6)
  np.testing.assert_allclose(b.Z0[:, 4:, :6], b.Y)
  np.testing.assert_allclose(b.Y, b.W_star @ b.X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,field", [
    (lambda: loopicl.LoopedLinearTransformer(0, 1, rngs=nnx.Rngs(0)), "d="),
    (lambda: loopicl.LoopedLinearTransformer(3, 1, "mlp", rngs=nnx.Rngs(0)), "parameterization="),
    (lambda: loopicl.LoopedLinearTransformer(3, 1, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 5)), loops=0), "loops="),
    (lambda: construction.gd_transformer(3, 1, preconditioner=np.eye(4)), "preconditioner"),
    (lambda: construction.gd_transformer(3, 1), "step_size"),
    (lambda: tasks.sample(jax.random.key(0), _task(3, 1, 1, kind="classification"), 2), "task.kind"),
    (lambda: tasks.sample(jax.random.key(0), _task(3, 1, 1, n=0), 2), "task.n_context"),
    (lambda: tasks.sample(jax.random.key(0), _task(0, 1, 1), 2), "task.d="),
    (lambda: tasks.sample(jax.random.key(0), _task(3, 1, 1, condition_number=0.5), 2), "task.condition_number"),
    (lambda: tasks.sample(jax.random.key(0), _task(3, 1, 1, noise_std=-1.0), 2), "task.noise_std"),
])
def test_bad_arguments_raise_value_error(call, field):
  with pytest.raises(ValueError, match="allowed") as info:
    call()
  assert field in str(info.value)
