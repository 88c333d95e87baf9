"""loopicl/optim.py: the overflow-free global norm and clipping against optax, and the learning
rate schedule against its closed form."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from loopicl import optim


def test_global_norm_does_not_overflow_and_clip_matches_optax():
  tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[2e20]])}
  assert np.isfinite(float(optim.global_norm(tree)))
  np.testing.assert_allclose(float(optim.global_norm(tree)), np.sqrt(9 + 16 + 4e40), rtol=1e-6)
  clipped, _ = optim.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
  np.testing.assert_allclose(float(clipped["b"][0, 0]), 1.0, rtol=1e-6)
  small = {"a": jnp.array([0.3, -2.0]), "b": jnp.array([[0.5]])}
  for limit in (1.0, 10.0):
    ours, _ = optim.clip_by_global_norm(limit).update(small, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(limit).update(small, optax.EmptyState())
    for k in small:  # bit for bit: runs that never overflowed train exactly as before
      np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(ref[k]))
  big = {"a": 30.0 * jax.random.normal(jax.random.key(0), (11, 11))}
  assert np.array_equal(np.asarray(optim.global_norm(big)), np.asarray(optax.tree.norm(big)))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_is_warmup_then_the_closed_form(schedule):
  t = ml_collections.ConfigDict({"learning_rate": 0.1, "warmup_steps": 10, "steps": 110,
                                 "schedule": schedule})
  lr = optim.learning_rate_schedule(t)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10)], [0.0, 0.05, 0.1], rtol=1e-6)
  expect = 0.1 if schedule == "constant" else 0.1 * 0.5 * (1 + np.cos(np.pi * 50 / 100))
  np.testing.assert_allclose(float(lr(60)), expect, rtol=1e-5)
  assert float(lr(110)) == pytest.approx(0.1 if schedule == "constant" else 0.0, abs=1e-7)
