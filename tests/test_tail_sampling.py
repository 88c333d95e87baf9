"""Tail-holding training batches (loopicl/linear/tail_sampling.py) and the overflow-free clip,
against numpy float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from loopicl import config as config_lib, registry, optim, step as step_lib
from loopicl.errors import ConfigError
from loopicl.linear import family as family_lib, tail_sampling, tasks
from tests import numpy_reference


def _task(n=15, kappa=10.0, rotate=True):
  c = default.get_config().task
  c.n_context, c.condition_number, c.rotate = n, kappa, rotate
  return c


def _philox_numpy(c0, c1, k0, k1):
  """Philox4x32-10 in numpy uint64 (every value < 2^32), Random123's round as published."""
  M = np.uint64(0xFFFFFFFF)
  x0, x1 = np.asarray(c0, np.uint64), np.asarray(c1, np.uint64)
  x2, x3 = np.zeros_like(x0), np.zeros_like(x0)
  k0, k1 = np.uint64(k0), np.uint64(k1)
  for _ in range(10):
    p0, p1 = np.uint64(0xD2511F53) * x0, np.uint64(0xCD9E8D57) * x2
    x0, x1, x2, x3 = (p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & M, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & M
    k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M, (k1 + np.uint64(0xBB67AE85)) & M
  return x0, x1, x2, x3


def _candidates_numpy(key_data, candidates, d, n):
  """The candidates' inputs G_c [k, d, n] in float64: element e from Philox word e % 4 of counter
  (c, e // 4), u = ((bits >> 9) + ½)·2^-22 − 1, z = Φ⁻¹((u + 1) / 2) (statistics.NormalDist)."""
  import statistics
  e = np.arange(d * n)
  c = np.asarray(candidates, np.uint64)[:, None] + np.zeros(d * n, np.uint64)
  words = _philox_numpy(c, np.broadcast_to((e // 4).astype(np.uint64), c.shape), *map(int, key_data))
  bits = np.choose(e % 4, words)
  u = ((bits >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0 ** -22 - 1.0
  inv = np.vectorize(statistics.NormalDist().inv_cdf)
  return inv((u + 1.0) / 2.0).reshape(-1, d, n)


def test_philox_matches_random123_known_answers():
  from loopicl import prng
  kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
         ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
         ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
          (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
  for counter, key, expected in kat:
    assert [int(w) for w in prng.philox4x32(counter, key)] == list(expected)
  assert [int(w) for w in _philox_numpy(0, 0, 0, 0)] == list(kat[0][2])  # the tests' own reference


def test_candidate_inputs_are_standard_normals_from_philox():
  """prng.philox_normals (the XLA path) and the kernel's candidate_inputs against the float64
  numpy reference, and the kernel's against the jnp ones bit for bit but for rounding (log, FMA)."""
  from loopicl import kernels, prng
  d, n, key = 7, 11, np.array([12345, 678], np.uint32)
  cands = np.array([0, 1, 17, 299, 4096, 2**31 - 1], np.int32)
  ref = _candidates_numpy(key, cands, d, n)
  xla = np.asarray(prng.philox_normals(jnp.asarray(key), jnp.asarray(cands), d, n), np.float64)
  cpu = np.asarray(kernels.candidate_inputs(jnp.asarray(key), jnp.asarray(cands), d, n), np.float64)
  assert xla.shape == cpu.shape == (len(cands), d, n)
  np.testing.assert_allclose(xla, ref, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(cpu, ref, rtol=2e-6, atol=2e-6)
  z = np.asarray(prng.philox_normals(jnp.asarray(key), jnp.arange(20000), 10, 10)).ravel()
  se = 1 / np.sqrt(z.size)  # 2·10⁶ normals: mean 0, variance 1, kurtosis 3 within ~5 s.e.
  assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * np.sqrt(2) * se
  assert abs(np.mean(z ** 4) - 3) < 5 * np.sqrt(96) * se


def _whitened_lambda_max_numpy(X, task):
  lam, u = np.linalg.eigh(tasks.covariance(task))
  inv_sqrt = (u / np.sqrt(lam)) @ u.T
  G = inv_sqrt @ np.asarray(X, np.float64)
  return np.linalg.eigvalsh(G @ np.swapaxes(G, -1, -2) / X.shape[-1])[:, -1]


def test_score_is_the_whitened_lambda_max():
  task = _task()
  X = tasks.sample(jax.random.key(0), task, 512).X
  got = np.asarray(tail_sampling.whitened_lambda_max(X, task))
  ref = _whitened_lambda_max_numpy(X, task)
  rel = np.abs(got - ref) / ref
  assert np.median(rel) < 1e-3 and np.all(got <= ref * (1 + 1e-4))  # a Rayleigh quotient: ≤ λ_max
  top = set(np.argsort(-ref)[:16])
  assert len(top & set(np.argsort(-got)[:16])) >= 15


def test_batch_is_the_pool_top_plus_others_with_weights_summing_to_one():
  task, B, pool, tail = _task(), 32, 8, 4
  key = jax.random.key(3)
  b = tail_sampling.sample(key, task, B, pool, tail)
  pool_key = np.asarray(jax.random.key_data(jax.random.split(key, 4)[0]))
  X_pool = (tasks.covariance_basis(task) * np.sqrt(tasks.covariance_spectrum(task))) @ _candidates_numpy(pool_key, np.arange(pool * B), task.d, task.n_context)
  score = _whitened_lambda_max_numpy(X_pool, task)
  rows = [int(np.argmin(np.abs(X_pool - x).sum(axis=(1, 2)))) for x in np.asarray(b.X)]
  assert len(set(rows)) == B                                  # B distinct candidates
  assert set(rows[:tail]) == set(np.argsort(-score)[:tail])   # the tail: the pool's top scores
  assert not set(rows[tail:]) & set(rows[:tail])
  w = np.asarray(b.weight)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[:tail], 1 / (pool * B), rtol=1e-6)
  # The batch is a real batch of prompts: labels are W* x.
  np.testing.assert_allclose(np.asarray(b.Y), np.asarray(b.W_star @ b.X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [15, 40])
def test_weighted_estimate_is_unbiased(n):
  """E[Σ_b w_b f(prompt_b)] = E[f] for f = λ_max⁶ (dominated by the tail), within 5 standard errors."""
  task = _task(n=n, kappa=1.0, rotate=False)
  f = lambda X: _whitened_lambda_max_numpy(X, task) ** 6
  draw = jax.jit(lambda key: tail_sampling.sample(key, task, 64, 8, 8))
  weighted = [float(f(b.X) @ np.asarray(b.weight, np.float64))
              for b in (draw(jax.random.key(i)) for i in range(200))]
  uniform = f(tasks.sample(jax.random.key(10**6), task, 200 * 64).X)
  se = np.hypot(np.std(weighted) / np.sqrt(len(weighted)), np.std(uniform) / np.sqrt(len(uniform)))
  assert abs(np.mean(weighted) - np.mean(uniform)) < 5 * se
  assert np.std(weighted) < np.std([np.mean(uniform[i * 64:(i + 1) * 64]) for i in range(200)])


def test_training_loss_weights_each_prompt():
  """The loss of the path runs train with (LinearFamily.make_loss on its own sample) is Σ w ℓ."""
  cfg = default.get_config()
  cfg.task.n_context, cfg.model.loops = 15, 3
  cfg.model.parameterization = "full"
  cfg.linear.tail_pool, cfg.linear.tail_prompts = "4", 4
  fam = family_lib.LinearFamily(cfg)
  model = fam.create_model(__import__("flax").nnx.Rngs(0))
  model.Q[...] = model.Q[...].at[:10, :10].set(0.05 * jnp.eye(10))
  model.P[...] = model.P[...].at[10:, 10:].set(-1.0)
  batch = fam.sample(jax.random.key(1), 16)
  loss, _ = fam.make_loss()(model, batch, 3)
  P, Q = (np.asarray(v, np.float64) for v in model.weights())
  out, _ = numpy_reference.looped_transformer_textbook(P, Q, np.asarray(batch.Z0), 3, 1, 1)
  per_prompt = np.mean((out[-1] - np.asarray(batch.targets, np.float64)) ** 2, axis=(1, 2))
  assert np.ptp(np.asarray(batch.weight)) > 0  # weights differ: a mean would not pass
  np.testing.assert_allclose(float(loss), per_prompt @ np.asarray(batch.weight, np.float64), rtol=1e-4)


@pytest.mark.parametrize("field, value", [("tail_pool", "0"), ("tail_pool", "8x"),
                                          ("tail_prompts", 128), ("tail_prompts", -1)])
def test_bad_tail_fields_fail_in_one_line(field, value):
  cfg = default.get_config()
  cfg.linear[field] = value
  with pytest.raises(ConfigError, match=f"linear.{field}") as e:
    config_lib.validate(cfg)
  assert "\n" not in str(e.value)


def test_auto_pool_is_64_only_for_deep_loops_on_few_examples():
  """linear.tail_pool = "auto" (the default): 64 candidates per kept prompt where T ≥ 20 and
  n < 3d, 8 elsewhere — checked against the rule written out, on the learning table's settings
  and around both edges; the family trains with what it resolves."""
  from configs import learning as learning_config
  from loopicl.experiments import learning
  config = learning_config.get_config()
  for s in config.grid.settings:
    p = learning.setting_dict(s)
    exp = learning.experiment_config(config, p)
    want = 64 if (p["loops"] >= 20 and p["n"] < 3 * p["d"]) else 8
    assert exp.linear.tail_pool == "auto"
    assert family_lib.LinearFamily(exp).tail_pool == want, p
    assert exp.linear.tail_prompts == exp.train.batch_size // 8
  for (loops, d, n), pool in {(19, 10, 15): 8, (20, 10, 15): 64, (20, 10, 29): 64, (20, 10, 30): 8,
                              (40, 10, 5): 64, (5, 10, 5): 8}.items():
    assert tail_sampling.auto_pool(loops, d, n) == pool, (loops, d, n)
  assert tail_sampling.resolve_pool("3", 20, 10, 15) == 3


def test_a_run_trains_on_tail_holding_batches(tmp_path):
  """The path users run (train_and_evaluate, the jitted scan of steps) with tail_pool > 1: it
  trains, learns, and its batches differ from the uniform run's (the parameters do too)."""
  from tests.test_train import _final_params, _metrics_lines, _run, tiny_config
  _run(tiny_config(**{"linear.tail_pool": "1", "linear.tail_prompts": 0}), tmp_path / "uniform")
  tail = _run(tiny_config(**{"linear.tail_pool": "4", "linear.tail_prompts": 4}), tmp_path / "tail")
  step_u, p_u = _final_params(tmp_path / "uniform")
  step_t, p_t = _final_params(tmp_path / "tail")
  assert step_u == step_t == tail["step"] == 60
  assert all(np.all(np.isfinite(v)) for v in p_t.values())
  assert not np.allclose(p_u["Q"], p_t["Q"])
  lines = [__import__("json").loads(l) for l in _metrics_lines(tmp_path / "tail")]
  assert lines[-1]["test_error"] < lines[0]["test_error"]  # it learns


def test_kernel_scores_are_the_lambda_max_of_the_candidates():
  """The fused kernel's score (loopicl/kernels candidate_scores), vmapped over a seed axis, against
  numpy eigvalsh (float64) of the reference candidates and the XLA power iteration."""
  from loopicl import kernels
  d, n, count = 7, 11, 300   # count not a multiple of the SIMD width: a partial last block
  keys = np.array([[1, 2], [3, 4], [5, 6]], np.uint32)
  got = np.asarray(jax.vmap(lambda k: kernels.candidate_scores(k, count, d, n, 16))(jnp.asarray(keys)), np.float64)
  G = np.stack([_candidates_numpy(k, np.arange(count), d, n) for k in keys])
  ref = np.linalg.eigvalsh(G @ np.swapaxes(G, -1, -2) / n)[..., -1]
  rel = np.abs(got - ref) / ref
  assert got.shape == (3, count)
  assert np.median(rel) < 1e-3 and np.all(got <= ref * (1 + 1e-5))  # a Rayleigh quotient: ≤ λ_max
  Gj = jnp.asarray(G, jnp.float32)
  xla = np.asarray(jax.vmap(tail_sampling._power_lambda_max)(Gj @ jnp.swapaxes(Gj, -1, -2) / n))
  np.testing.assert_allclose(got, xla, rtol=1e-5)


@pytest.mark.parametrize("n", [15, 40])
def test_kernel_and_xla_scoring_draw_the_same_batch(n):
  """The CPU path (kernel=True, what training uses there) and XLA's give one batch (the same
  candidates up to the last bit of a normal: their log and FMAs round differently)."""
  task = _task(n=n)
  keys = jax.random.split(jax.random.key(7), 4)
  draw = lambda kernel: jax.jit(jax.vmap(lambda k: tail_sampling.sample(k, task, 64, 8, 8, kernel=kernel)))(keys)
  a, b = draw(True), draw(False)
  np.testing.assert_allclose(np.asarray(a.X), np.asarray(b.X), rtol=1e-5, atol=1e-5)  # the same prompts
  np.testing.assert_array_equal(np.asarray(a.weight), np.asarray(b.weight))


def test_training_samples_with_the_kernel_exactly_when_the_model_does():
  """The training step a run builds (step.make_train_step) scores its pool with the fused kernel
  when model.kernel resolves to it, and with XLA otherwise: read from the lowered program."""
  for kernel, expected in (("cpu", True), ("xla", False)):
    cfg = default.get_config()
    cfg.task.d, cfg.task.n_context, cfg.model.loops, cfg.train.batch_size = 4, 8, 2, 16
    cfg.linear.tail_prompts = 2
    cfg.model.kernel = kernel
    family = registry.of(cfg, training=True)
    tx = optim.make_optimizer(cfg.train)
    model_def, state = step_lib.init_state(family, tx, 0)
    step = jax.jit(step_lib.make_train_step(family, model_def, tx, 16, 2))
    text = step.lower(state, jnp.int32(0)).as_text()
    assert ("loopicl_candidate_scores" in text) == expected, kernel
