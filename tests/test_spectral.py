"""GD in closed form (loopicl.linear.spectral) against independent numpy GD, the oracle bound
prompt by prompt, the step search and its shoulder rule, and the prompt-distribution summary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl import stats
from loopicl.experiments.reproduce import step_rules
from loopicl.linear import spectral, tasks
from tests import numpy_reference as ref


def _prompts(kind, d=6, n=12, noise=0.3, kappa=10.0, batch=64, seed=0):
  t = tasks.default_config()
  t.kind, t.d, t.n_context, t.noise_std, t.condition_number, t.rotate = kind, d, n, noise, kappa, True
  with jax.enable_x64(True):
    return t, tasks.sample(jax.random.key(seed), t, batch)


def _numpy_errors(W, b, kind):
  """[T+1, batch] error of numpy iterates W [T+1, batch, d_out, d] (query MSE or relative)."""
  W, Xq = np.asarray(W), np.asarray(b.X_query)
  if kind == "relative":
    Ws = np.asarray(b.W_star)
    return np.linalg.norm(W - Ws, axis=(-2, -1)) / np.linalg.norm(Ws, axis=(-2, -1))
  return np.mean((W @ Xq - np.asarray(b.targets)) ** 2, axis=(-2, -1))


@pytest.mark.parametrize("task_kind", ["linear_regression", "vector_generation"])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_closed_form_equals_iterated_gd_to_1e10(task_kind, preconditioned):
  """T = 0..20 steps in closed form = numpy GD iterated step by step (float64), for plain GD and
  for A = c·Σ⁻¹ (whitened prompts), with noise, rotated κ_Σ = 10; also the distance to least
  squares and least squares' own error."""
  kind = "relative" if task_kind == "vector_generation" else "mse"
  t, b = _prompts(task_kind)
  sigma = tasks.covariance(t)
  lam, U = np.linalg.eigh(sigma)
  S = (U / np.sqrt(lam)) @ U.T if preconditioned else None
  A = 0.3 * (np.linalg.inv(sigma) if preconditioned else np.eye(t.d))
  W = ref.preconditioned_gd(b.X, b.Y, A, 20)                                   # [21, batch, 1, d]
  X, Y = np.asarray(b.X), np.asarray(b.Y)
  W_ls = np.einsum("bon,bdn->bod", Y, X) @ np.linalg.inv(np.einsum("bdn,ben->bde", X, X))
  with jax.enable_x64(True):
    sp = spectral.decompose(b.X, b.Y, b.X_query, b.W_star if kind == "relative" else b.targets,
                            kind=kind, whitening=S)
    got = np.asarray(spectral.errors(sp, 0.3, np.arange(21), kind=kind))
    gap = np.asarray(spectral.distance_to_least_squares(sp, 0.3, np.arange(21), kind=kind))
    ls = np.asarray(spectral.least_squares_error(sp, kind=kind))
  np.testing.assert_allclose(got, _numpy_errors(W, b, kind), rtol=1e-10)
  if kind == "relative":
    want_gap = np.linalg.norm(W - W_ls, axis=(-2, -1)) / np.linalg.norm(np.asarray(b.W_star), axis=(-2, -1))
  else:
    want_gap = np.mean(((W - W_ls) @ np.asarray(b.X_query)) ** 2, axis=(-2, -1))
  np.testing.assert_allclose(gap, want_gap, rtol=1e-9)
  np.testing.assert_allclose(ls, _numpy_errors(W_ls[None], b, kind)[0], rtol=1e-9)


def test_per_prompt_and_per_loop_steps_and_large_T():
  """A [batch] step (one per prompt) and a [L, 1] step (one per T) give what scalar steps give;
  T = 200 matches 200 numpy steps; a step past a prompt's edge blows that prompt up (inf), and
  the batch mean used by the search is +inf then."""
  t, b = _prompts("linear_regression", noise=0.0, kappa=1.0)
  X = np.asarray(b.X)
  lam = np.linalg.eigvalsh(np.einsum("bdn,ben->bde", X, X) / X.shape[-1])
  etas = 2.0 / (lam[:, -1] + lam[:, 0])
  with jax.enable_x64(True):
    sp = spectral.decompose(b.X, b.Y, b.X_query, b.targets, kind="mse")
    per_prompt = np.asarray(spectral.errors(sp, etas, [3, 200], kind="mse"))
    per_loop = np.asarray(spectral.errors(sp, jnp.array([[0.2], [0.4]]), [3, 200], kind="mse"))
    scalar = [np.asarray(spectral.errors(sp, e, [T], kind="mse"))[0] for e, T in ((0.2, 3), (0.4, 200))]
    too_big = np.asarray(spectral.errors(sp, 3.0 / lam[:, -1].min(), [2000], kind="mse"))[0]
    mean = np.asarray(spectral.mean_errors(sp, [0.4, 3.0 / lam[:, -1].min()], [200, 2000], kind="mse"))
  for i in (0, 5):
    W = ref.preconditioned_gd(X[i:i + 1], np.asarray(b.Y)[i:i + 1], etas[i] * np.eye(t.d), 200)
    want = np.mean((W[[3, 200]] @ np.asarray(b.X_query)[i:i + 1] - np.asarray(b.targets)[i:i + 1]) ** 2,
                   axis=(-2, -1))[:, 0]
    np.testing.assert_allclose(per_prompt[:, i], want, rtol=1e-8, atol=1e-28)
  np.testing.assert_allclose(per_loop[0], scalar[0], rtol=1e-12)
  np.testing.assert_allclose(per_loop[1], scalar[1], rtol=1e-12)
  assert not np.all(np.isfinite(too_big)) and mean[0] == pytest.approx(scalar[1].mean(), rel=1e-12)
  assert mean[1] == np.inf


@pytest.mark.parametrize("task_kind", ["linear_regression", "vector_generation"])
def test_oracle_bound_holds_prompt_by_prompt_against_numpy(task_kind):
  """Each prompt's own step η_i = 2/(λ_max+λ_min): its distance to least squares, iterated in
  numpy, never exceeds ρ(κ̂_i)^{2T}·||W_LS||²·||X_q||₂²/(d_out·m) (MSE) or ρ^T·||W_LS||/||W*||
  (relative) — the constant derived in the test from the contraction ||W_T − W_LS|| ≤ ρ^T ||W_LS||
  — and spectral.oracle_bound is that bound; at T = 1 some prompt comes within 50% of it (the
  bound is not vacuous)."""
  kind = "relative" if task_kind == "vector_generation" else "mse"
  t, b = _prompts(task_kind, d=5, n=10, noise=0.2, kappa=1.0, batch=64, seed=3)
  X, Y, Xq = (np.asarray(v) for v in (b.X, b.Y, b.X_query))
  lam = np.linalg.eigvalsh(np.einsum("bdn,ben->bde", X, X) / X.shape[-1])
  kappa_hat = lam[:, -1] / lam[:, 0]
  rho = (kappa_hat - 1) / (kappa_hat + 1)
  W_ls = np.einsum("bon,bdn->bod", Y, X) @ np.linalg.inv(np.einsum("bdn,ben->bde", X, X))
  T = np.arange(1, 31)
  dist, bound = [], []
  for i in range(X.shape[0]):
    W = ref.preconditioned_gd(X[i:i + 1], Y[i:i + 1], 2.0 / (lam[i, -1] + lam[i, 0]) * np.eye(t.d), 30)[T, 0]
    ls_norm = np.linalg.norm(W_ls[i])
    if kind == "relative":
      w_norm = np.linalg.norm(np.asarray(b.W_star)[i])
      dist.append(np.linalg.norm(W - W_ls[i], axis=(-2, -1)) / w_norm)
      bound.append(rho[i] ** T * ls_norm / w_norm)
    else:
      dist.append(np.mean(((W - W_ls[i]) @ Xq[i]) ** 2, axis=(-2, -1)))
      bound.append(rho[i] ** (2 * T) * ls_norm ** 2 * np.linalg.norm(Xq[i], 2) ** 2 / Xq.shape[-1])
  dist, bound = np.array(dist).T, np.array(bound).T                               # [T, batch]
  assert np.all(dist <= bound * (1 + 1e-9) + 1e-300)
  assert np.max(dist[0] / bound[0]) > 0.5
  with jax.enable_x64(True):
    sp = spectral.decompose(b.X, b.Y, b.X_query, b.W_star if kind == "relative" else b.targets, kind=kind)
    np.testing.assert_allclose(np.asarray(spectral.oracle_bound(sp, T, kind=kind)), bound, rtol=1e-9)
    # the grid's record counts violations with the same rule: none here
    recs, _ = step_rules.seed_records(t, b, _fake_tuned(len(T)), list(T), 1e-3)
  assert all(r["bound_violations"] == 0 for r in recs["construction_oracle"].values())


def _fake_tuned(L):
  one = {"step": np.full(L, 0.3), "optimum": np.full(L, 0.3), "validation": np.ones(L)}
  return {"construction": one, "pgd": one}


def test_tuned_step_is_the_searched_optimum_and_the_shoulder_is_on_its_left():
  """η* is the argmin of the scan mean (checked on a fine numpy grid of the closed form, itself
  checked above); the shoulder step is ≤ η* with mean ≤ 1.1 × min, and a step 2% smaller than
  it has a mean above that (it is the smallest such step, up to the bisection)."""
  t, b = _prompts("linear_regression", d=4, n=8, noise=0.0, kappa=1.0, batch=2048, seed=1)
  loops = [1, 5, 30]
  with jax.enable_x64(True):
    sp = spectral.decompose(b.X, b.Y, b.X_query, b.targets, kind="mse")
    rule, star, best = spectral.tune_constant_step(sp, loops, kind="mse", shoulder=1.1)
    grid = np.linspace(0.05, 1.5, 240)
    for j, T in enumerate(loops):
      means = np.asarray(spectral.mean_errors(sp, grid, np.full(grid.shape, T), kind="mse"))
      assert best[j] <= means.min() * (1 + 1e-6)
      assert abs(star[j] - grid[np.argmin(means)]) <= 2 * (grid[1] - grid[0])
      at = np.asarray(spectral.mean_errors(sp, [rule[j], 0.98 * rule[j]], [T, T], kind="mse"))
      assert rule[j] <= star[j] and at[0] <= 1.1 * best[j] * (1 + 1e-9) and at[1] > 1.1 * best[j]


def test_safe_step_is_the_marchenko_pastur_edge():
  t = tasks.default_config()
  t.d, t.n_context, t.condition_number = 10, 40, 100.0
  assert step_rules.safe_step(t) == pytest.approx(1.0 / (1.0 + np.sqrt(10 / 40)) ** 2, rel=1e-12)


def test_prompt_distribution_against_numpy():
  rng = np.random.default_rng(0)
  v = rng.lognormal(size=(3, 1001))
  v[1, :7] = np.inf
  v[2, 3] = np.nan
  out = stats.prompt_distribution(v, 0.5)
  for i in range(3):
    finite = v[i][np.isfinite(v[i])]
    srt = np.sort(np.where(np.isnan(v[i]), np.inf, v[i]))
    assert out["error"][i] == pytest.approx(finite.mean(), rel=1e-12)
    assert out["nonfinite"][i] == v.shape[1] - finite.size
    for key, q in (("error_median", 0.5), ("error_q90", 0.9), ("error_q99", 0.99)):
      assert out[key][i] == srt[int(np.ceil(q * v.shape[1])) - 1]     # the empirical quantile
    assert out["frac_below_eps"][i] == pytest.approx(np.mean(finite <= 0.5) * finite.size / v.shape[1])
