"""The fused CPU kernel (model.kernel="cpu") against the plain form and the numpy reference."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl import config as config_lib
from loopicl import registry, kernels, optim, step as step_lib
from loopicl.linear import model
from tests import numpy_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (batch, d, n, m, d_out, loops): a batch that fills no SIMD block evenly, several queries and
# outputs, one loop, a single context column, and the paper-like shape.
SHAPES = [(37, 5, 9, 2, 2, 3), (3, 4, 1, 1, 1, 1), (16, 3, 6, 1, 1, 7), (64, 20, 40, 1, 1, 10)]


def _problem(batch, d, n, m, d_out, loops, seed=0):
  D, N = d + d_out, n + m
  k = jax.random.split(jax.random.key(seed), 4)
  Z0 = jax.random.normal(k[0], (batch, D, N), jnp.float32)
  scale = 0.3 / np.sqrt(D)  # a contraction-sized block, so T loops stay finite
  P = scale * jax.random.normal(k[1], (D, D), jnp.float32)
  Q = scale * jax.random.normal(k[2], (D, D), jnp.float32)
  weights = jax.random.normal(k[3], (loops, batch, d_out, m), jnp.float32)
  return P, Q, Z0, weights


def _fused(P, Q, Z0, n, d_out, loops, remat=False, threads=0):
  return jax.jit(kernels.fused_readouts, static_argnums=(3, 4, 5, 6, 7))(
      P, Q, Z0, n, d_out, loops, remat, threads)


@pytest.mark.parametrize("shape", SHAPES)
def test_readouts_match_the_numpy_reference(shape):
  batch, d, n, m, d_out, loops = shape
  P, Q, Z0, _ = _problem(*shape)
  expected, _ = numpy_reference.looped_transformer_textbook(
      np.asarray(P, np.float64), np.asarray(Q, np.float64), np.asarray(Z0, np.float64), loops, m, d_out)
  got = np.asarray(_fused(P, Q, Z0, n, d_out, loops), np.float64)
  assert got.shape == expected.shape == (loops, batch, d_out, m)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("remat", [False, True])
def test_gradients_match_float64_autodiff_of_the_plain_form(shape, remat):
  """Hand-derived backward (C++) against jax.grad of model.loop_readouts in float64."""
  batch, d, n, m, d_out, loops = shape
  P, Q, Z0, w = _problem(*shape)

  def fused_loss(P, Q, Z0):
    return jnp.sum(w * kernels.fused_readouts(P, Q, Z0, n, d_out, loops, remat, 0))

  got = jax.jit(jax.grad(fused_loss, argnums=(0, 1, 2)))(P, Q, Z0)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (P, Q, Z0, w)]

    def plain_loss(P, Q, Z0):
      return jnp.sum(args64[3] * model.loop_readouts(P, Q, Z0, loops=loops, d_out=d_out,
                                                     n_queries=m))

    expected = jax.grad(plain_loss, argnums=(0, 1, 2))(*args64[:3])
    expected = [np.asarray(e) for e in expected]
  for name, g, e in zip(("dP", "dQ", "dZ0"), got, expected):
    assert g.shape == e.shape, name
    np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=1e-3,
                               atol=1e-4 * np.abs(e).max(), err_msg=name)


def test_result_does_not_depend_on_the_thread_count():
  """Blocks may run on any thread; the (P, Q) gradient is still summed in block order."""
  shape = (200, 6, 12, 1, 1, 4)
  P, Q, Z0, w = _problem(*shape)

  def grads(threads):
    def loss(P, Q, Z0):
      return jnp.sum(w * kernels.fused_readouts(P, Q, Z0, 12, 1, 4, False, threads))
    return [np.asarray(g) for g in jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(P, Q, Z0)[1]]

  one, three, again = grads(1), grads(3), grads(3)
  for a, b, c in zip(one, three, again):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


def test_vmap_over_a_seed_axis_equals_each_seed():
  P, Q, Z0, _ = _problem(19, 4, 8, 1, 1, 3)
  Ps = jnp.stack([P, 0.5 * P, -P])
  Qs = jnp.stack([Q, Q, 0.7 * Q])
  batched = jax.vmap(lambda p, q: kernels.fused_readouts(p, q, Z0, 8, 1, 3, False, 0))(Ps, Qs)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(_fused(Ps[i], Qs[i], Z0, 8, 1, 3)))


@pytest.mark.parametrize("remat", [False, True])
def test_vmapped_gradients_equal_each_seeds_own(remat):
  """The sweep's path: vmap over seeds of value_and_grad, every operand per seed (P, Q and the
  batch), one kernel call for all models ("broadcast_all").  Each seed's loss and gradients
  must be bit for bit those of its own unbatched call; two mapped axes (nested vmap) too."""
  P, Q, Z0, _ = _problem(21, 5, 9, 1, 2, 4)
  rng = np.random.default_rng(3)
  Ps = jnp.asarray(P[None] * rng.uniform(0.5, 1.5, (3, 1, 1)), jnp.float32)
  Qs = jnp.asarray(Q[None] * rng.uniform(0.5, 1.5, (3, 1, 1)), jnp.float32)
  Zs = jnp.asarray(Z0[None] * rng.uniform(0.5, 1.5, (3, 1, 1, 1)), jnp.float32)

  def loss(p, q, z):
    return jnp.sum(jnp.square(kernels.fused_readouts(p, q, z, 9, 2, 4, remat, 0)))

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  value, grads = jax.jit(jax.vmap(grad))(Ps, Qs, Zs)
  nested_value, nested = jax.jit(jax.vmap(jax.vmap(grad)))(
      *(jnp.stack([x, x[::-1]]) for x in (Ps, Qs, Zs)))
  for i in range(3):
    own_value, own = jax.jit(grad)(Ps[i], Qs[i], Zs[i])
    assert float(value[i]) == float(own_value)
    assert float(nested_value[1, 2 - i]) == float(own_value)
    for g, n, o in zip(grads, nested, own):
      np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(o))
      np.testing.assert_array_equal(np.asarray(n[1, 2 - i]), np.asarray(o))


def _config(**overrides):
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  cfg.task.d, cfg.task.n_context, cfg.model.loops, cfg.train.batch_size = 6, 12, 4, 40
  for dotted, value in overrides.items():
    section, name = dotted.split(".")
    cfg[section][name] = value
  return cfg


def test_training_steps_match_the_xla_kernel():
  """Ten steps of the default recipe (sampling, loss, clipping, SOAP) with either kernel: same trajectory.

  The weights' change from their initial value is compared, not the weights: ten small Adam
  steps move them little, and a wrong gradient shows in the direction they moved.
  """
  losses, moved = {}, {}
  for kernel in ("xla", "cpu"):
    cfg = _config(**{"model.kernel": kernel})
    family = registry.of(cfg, training=True)
    tx = optim.make_optimizer(cfg.train)  # the optimizer a run trains with
    model_def, state = step_lib.init_state(family, tx, cfg.train.seed)
    start = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
    step = jax.jit(step_lib.make_train_step(family, model_def, tx, 40, 4))
    out = []
    for s in range(10):
      state, metrics = step(state, jnp.int32(s))
      out.append(float(metrics["loss"]))
    losses[kernel] = np.array(out)
    moved[kernel] = [np.asarray(x) - x0 for x, x0 in zip(jax.tree.leaves(state["params"]), start)
                     if np.asarray(x).dtype == np.float32 and np.asarray(x).ndim == 2]
  assert np.all(np.isfinite(losses["cpu"]))
  np.testing.assert_allclose(losses["cpu"], losses["xla"], rtol=1e-4)
  assert moved["cpu"] and len(moved["cpu"]) == len(moved["xla"])
  for a, b in zip(moved["cpu"], moved["xla"]):
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())


def test_auto_resolves_to_the_kernel_only_where_it_applies():
  assert model.resolve_kernel("auto") == "cpu"  # one CPU device, float32, reassociated
  assert model.resolve_kernel("auto", form="textbook") == "xla"
  assert model.resolve_kernel("auto", dtype=jnp.float64) == "xla"
  assert model.resolve_kernel("xla") == "xla"


@pytest.mark.parametrize("overrides, field, allowed", [
    ({"model.kernel": "gpu"}, "model.kernel", "auto | xla | cpu"),
    ({"model.kernel_threads": -1}, "model.kernel_threads", "an integer >= 0"),
])
def test_bad_kernel_fields_fail_in_one_line(overrides, field, allowed):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**overrides))
  message = str(e.value)
  assert "\n" not in message and field in message and allowed in message


def test_cpu_kernel_refuses_what_it_does_not_compute():
  with pytest.raises(ValueError, match="form='reassociated'"):
    model.resolve_kernel("cpu", form="textbook")
  with pytest.raises(ValueError, match="float32"):
    model.resolve_kernel("cpu", dtype=jnp.float64)


def _run(code: str, *argv: str, **env):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True,
                        text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_a_failed_build_is_one_line_leaves_no_file_and_auto_falls_back(tmp_path):
  cache = tmp_path / "cache"
  result = _run("""
      import jax.numpy as jnp
      from loopicl import kernels
      from loopicl.linear import model
      print(model.resolve_kernel("auto"))
      try:
        model.resolve_kernel("cpu")
      except kernels.KernelUnavailable as e:
        print("ERROR", e)
      """, CXX="false", LOOPICL_KERNEL_CACHE=str(cache))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "xla"
  assert lines[1].startswith("ERROR model.kernel='cpu': building") and "model.kernel='xla'" in lines[1]
  assert list(cache.iterdir()) == []  # the temporary build output was removed


def test_unrolled_threefry_draws_the_same_bits_as_plain_jax():
  """loopicl swaps JAX's CPU threefry lowering for the unrolled one: the numbers must not move."""
  code = """
      import hashlib, sys
      import jax, numpy as np
      if sys.argv[-1] == "loopicl":
        import loopicl  # registers the unrolled lowering
        assert loopicl.prng.use_unrolled_threefry()
      k = jax.random.fold_in(jax.random.key(7), 3)
      x = jax.jit(lambda k: (jax.random.normal(k, (64, 5, 33)), jax.random.uniform(k, (1001,)),
                             jax.random.randint(k, (77,), 0, 1000)))(k)
      print(hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in x)).hexdigest())
      """
  outs = []
  for mode in ("plain", "loopicl"):
    r = _run(code, mode)
    assert r.returncode == 0, r.stderr
    outs.append(r.stdout.strip())
  assert len(outs[0]) == 64 and outs[0] == outs[1]


def test_flat_normal_draws_the_same_numbers_as_the_shaped_draw():
  """prng.normal (drawn flat, then reshaped: the fast layout on a CPU) equals jax.random.normal
  with the shape, bit for bit, jitted and under vmap over keys (as the sweep draws)."""
  from loopicl import prng
  keys = jax.random.split(jax.random.key(11), 3)
  for shape in ((64, 10, 10), (7, 1, 5), (5,), (2, 3, 4, 5)):
    shaped = jax.jit(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32)))(keys)
    flat = jax.jit(jax.vmap(lambda k: prng.normal(k, shape, jnp.float32)))(keys)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(shaped))


def test_cpu_kernel_on_several_devices_is_refused_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "scripts/train.py", "--config=configs/default.py", f"--workdir={tmp_path}",
       "--config.cpu_devices=2", "--config.model.kernel=cpu", "--config.train.steps=2"],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: model.kernel='cpu' runs on one device") and "kernel='xla'" in last
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 ISA levels")
def test_the_avx2_build_computes_the_same(tmp_path):
  """A machine without AVX-512 gets 8 lanes and 3 × 3 tiles: build that variant here and check it."""
  result = _run("""
      import json, numpy as np, jax, jax.numpy as jnp
      from loopicl import kernels
      from loopicl.linear import model
      P, Q, Z0 = (jax.random.normal(k, s, jnp.float32) * c for k, s, c in zip(
          jax.random.split(jax.random.key(1), 3), [(7, 7), (7, 7), (21, 7, 12)], [0.1, 0.1, 1.0]))
      w = jax.random.normal(jax.random.key(2), (4, 21, 2, 2))
      fused = lambda P, Q, Z: jnp.sum(w * kernels.fused_readouts(P, Q, Z, 10, 2, 4, False, 0))
      plain = lambda P, Q, Z: jnp.sum(w * model.loop_readouts(P, Q, Z, loops=4, d_out=2, n_queries=2))
      a = jax.value_and_grad(fused, argnums=(0, 1, 2))(P, Q, Z0)
      b = jax.value_and_grad(plain, argnums=(0, 1, 2))(P, Q, Z0)
      err = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in
                zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      print(json.dumps({"lanes": kernels.lanes(), "err": err}))
      """, LOOPICL_KERNEL_FLAGS="-march=x86-64-v3", LOOPICL_KERNEL_CACHE=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  import json
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["lanes"] == 8 and out["err"] < 1e-5


def test_config_fields_reach_the_model():
  from flax import nnx
  for kernel, threads in (("cpu", 1), ("xla", 0), ("auto", 3)):
    cfg = _config(**{"model.kernel": kernel, "model.kernel_threads": threads})
    built = registry.of(cfg).create_model(nnx.Rngs(0))
    assert built.kernel == kernel and built.threads == threads  # as asked: resolved by the family
    assert registry.of(cfg).kernel == "xla"  # evaluation never builds the kernel
    assert registry.of(cfg, training=True).kernel == ("xla" if kernel == "xla" else "cpu")
