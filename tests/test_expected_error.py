"""Each prompt's expected error over the query (loopicl/linear/expected_error.py) against a numpy
float64 Monte Carlo that draws many queries and label noises per prompt, the effective weights of
the looped transformer against its own predictions, and GD's closed form against its iterate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl.linear import construction, evaluation, expected_error, model as model_lib, tasks
from tests import numpy_reference as ref

D, D_OUT, N, T = 4, 2, 12, 4
DRAWS = 20_000  # Monte Carlo queries per prompt


def _task(**kw):
  c = tasks.default_config()
  c.d, c.d_out, c.n_context, c.n_queries = D, D_OUT, N, 3
  c.condition_number, c.rotate, c.noise_std = 10.0, True, 0.5
  for k, v in kw.items():
    c[k] = v
  return c


def _batch(task, count, seed=0):
  with jax.enable_x64(True):
    return tasks.sample(jax.random.key(seed), task, count)


def _trained_like(seed=1):
  """A 'trained-like' looped model: the GD construction with every block perturbed (off-block
  entries too), so its effective weights are not GD's."""
  with jax.enable_x64(True):
    P, Q = (np.asarray(w) for w in construction.gd_params(D, D_OUT, step_size=0.4))
  rng = np.random.default_rng(seed)
  return P + 0.08 * rng.standard_normal(P.shape), Q + 0.08 * rng.standard_normal(Q.shape)


def _model_weights(P, Q, batch, loops=T):
  with jax.enable_x64(True):
    return np.asarray(expected_error.effective_weights(
        lambda b: model_lib.loop_readouts(jnp.asarray(P), jnp.asarray(Q), b.Z0, loops=loops,
                                          d_out=D_OUT, n_queries=b.X_query.shape[-1]), batch))


def test_expected_error_matches_a_monte_carlo_over_queries_and_noise():
  """κ_Σ = 10 rotated, σ = 0.5, d_out = 2: for 3 prompts, GD's iterate W_T and a perturbed looped
  model, E_q = mean over outputs of (w − w*)ᵀΣ(w − w*) + σ² agrees with the average over 20 000
  fresh queries x ~ N(0, Σ) and label noises of (ŷ − W*x − ε)² within 3 standard errors — the
  model's ŷ from numpy's own loop on those queries, not from its effective weights.  The same
  draws reject Σ replaced by I and a missing σ² (the test can fail)."""
  task = _task()
  batch = _batch(task, 3)
  sigma, noise = tasks.covariance(task), float(task.noise_std)
  root = np.linalg.cholesky(sigma)
  X, Y, Ws, Z0 = (np.asarray(a, np.float64) for a in (batch.X, batch.Y, batch.W_star, batch.Z0))
  W_gd = ref.preconditioned_gd(X, Y, 0.3 * np.eye(D), T)[-1]                    # [3, d_out, d]
  P, Q = _trained_like()
  W_model = _model_weights(P, Q, batch)[-1]
  closed = {"gd": expected_error.expected_error(W_gd, Ws, sigma, noise),
            "model": expected_error.expected_error(W_model, Ws, sigma, noise)}
  wrong = {"gd": [expected_error.expected_error(W_gd, Ws, np.eye(D), noise),
                  expected_error.expected_error(W_gd, Ws, sigma, 0.0)],
           "model": [expected_error.expected_error(W_model, Ws, np.eye(D), noise),
                     expected_error.expected_error(W_model, Ws, sigma, 0.0)]}
  assert isinstance(closed["gd"], np.ndarray) and closed["gd"].dtype == np.float64
  rng = np.random.default_rng(7)
  rejected = {name: [False, False] for name in closed}
  for i in range(len(X)):
    x = root @ rng.standard_normal((D, DRAWS))
    y = Ws[i] @ x + noise * rng.standard_normal((D_OUT, DRAWS))
    Z = np.concatenate([Z0[i, :, :N], np.concatenate([x, np.zeros((D_OUT, DRAWS))])], axis=-1)
    preds = {"gd": W_gd[i] @ x,
             "model": ref.looped_transformer_columns(P, Q, Z[None], T, DRAWS, D_OUT)[-1, 0]}
    for name, pred in preds.items():
      per_query = np.mean((pred - y) ** 2, axis=0)                             # mean over outputs
      mc, se = per_query.mean(), per_query.std(ddof=1) / np.sqrt(DRAWS)
      assert abs(closed[name][i] - mc) <= 3 * se, (name, i, closed[name][i], mc, se)
      for k, bad in enumerate(wrong[name]):
        rejected[name][k] |= abs(bad[i] - mc) > 3 * se
  assert all(all(r) for r in rejected.values()), rejected


def test_effective_weights_of_the_looped_transformer_are_its_predictions():
  """W_eff read at the unit queries, times random queries, is the model's own read-out on them
  at every loop (to float64 rounding): the loop is linear in the query.  It is also the report's
  sensitivity S_t (`evaluation.query_sensitivities`, probes appended beside the m queries)."""
  task = _task()
  batch = _batch(task, 16, seed=2)
  P, Q = _trained_like(seed=3)
  W = _model_weights(P, Q, batch)                                               # [T, 16, d_out, d]
  assert W.shape == (T, 16, D_OUT, D)
  with jax.enable_x64(True):
    preds, sens = evaluation.query_sensitivities(jnp.asarray(P), jnp.asarray(Q), batch.Z0, loops=T,
                                                 d_out=D_OUT, n_queries=3)
  Xq = np.asarray(batch.X_query)
  np.testing.assert_allclose(W @ Xq, np.asarray(preds), rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(W, np.asarray(sens), rtol=1e-12, atol=1e-13)
  textbook, _ = ref.looped_transformer_textbook(P, Q, np.asarray(batch.Z0), T, 3, D_OUT)
  np.testing.assert_allclose(W @ Xq, textbook, rtol=1e-10, atol=1e-12)
  with jax.enable_x64(True):
    unit = expected_error.unit_query_batch(batch)
  assert unit.Z0.shape == (16, D + D_OUT, N + D)  # m = 3 queries out, d = 4 unit queries in
  np.testing.assert_array_equal(np.asarray(unit.Z0[..., :N]), np.asarray(batch.Z0[..., :N]))


def test_closed_form_gd_and_pgd_equal_the_formula_on_their_iterates():
  """`spectral_expected_errors` (the grid's and the learning table's path) is E_q of numpy's GD
  iterate for a scalar step, a step per T and a step per prompt, and of PGD with c·Σ⁻¹ (GD on the
  whitened prompt): float64 agreement."""
  task = _task(noise_std=0.1)
  batch = _batch(task, 32, seed=4)
  sigma = tasks.covariance(task)
  X, Y, Ws = (np.asarray(a, np.float64) for a in (batch.X, batch.Y, batch.W_star))
  loops = [1, 3, 7]
  lam, U = np.linalg.eigh(sigma)
  S = (U / np.sqrt(lam)) @ U.T                                                  # Σ^{-1/2}
  per_prompt = np.linspace(0.2, 0.5, 32)
  with jax.enable_x64(True):
    sq = expected_error.query_decomposition(batch, sigma)
    sq_pgd = expected_error.query_decomposition(batch, sigma, whitening=S)
    got = {"scalar": expected_error.spectral_expected_errors(sq, 0.3, loops),
           "per_T": expected_error.spectral_expected_errors(sq, jnp.array([[0.2], [0.3], [0.4]]), loops),
           "per_prompt": expected_error.spectral_expected_errors(sq, jnp.asarray(per_prompt), loops),
           "pgd": expected_error.spectral_expected_errors(sq_pgd, 0.3, loops)}
  iterate = lambda A, t: ref.preconditioned_gd(X, Y, A, t)[-1]
  want = {"scalar": [expected_error.expected_error(iterate(0.3 * np.eye(D), t), Ws, sigma) for t in loops],
          "per_T": [expected_error.expected_error(iterate(eta * np.eye(D), t), Ws, sigma)
                    for eta, t in zip((0.2, 0.3, 0.4), loops)],
          "per_prompt": [np.array([expected_error.expected_error(
              ref.preconditioned_gd(X[i:i + 1], Y[i:i + 1], per_prompt[i] * np.eye(D), t)[-1], Ws[i:i + 1],
              sigma)[0] for i in range(32)]) for t in loops],
          "pgd": [expected_error.expected_error(iterate(0.3 * np.linalg.inv(sigma), t), Ws, sigma)
                  for t in loops]}
  for name in got:
    np.testing.assert_allclose(np.asarray(got[name]), np.array(want[name]), rtol=1e-9, err_msg=name)


def test_vector_generation_and_the_statistics_names():
  """Vector generation's queries are e_1 … e_d: with Σ_q = I/d, E_q is the query MSE of the
  read-out W itself.  `statistics` names the single-query and expected distributions apart."""
  task = _task(kind="vector_generation", condition_number=1.0, rotate=False, noise_std=0.0)
  rng = np.random.default_rng(0)
  W, Ws = rng.standard_normal((2, 5, D_OUT, D))
  np.testing.assert_allclose(expected_error.expected_error(W, Ws, expected_error.query_covariance(task)),
                             np.mean((W - Ws) ** 2, axis=(-2, -1)), rtol=1e-12)
  single, expected = rng.exponential(size=(2, 3, 400))
  out = expected_error.statistics(single, expected * 10, 1.0)
  assert set(out) == set(expected_error.RECORD_KEYS)
  assert out["error"] == pytest.approx(single.mean(-1)) and out["expected_error"] == pytest.approx(
      10 * expected.mean(-1))
  assert np.all(out["frac_expected_below_eps"] < out["single_query_frac_below_eps"])
  assert np.all(out["expected_error_median"] > out["single_query_error_median"])
