"""The one training loop (loop.py, step.py, schedule.py): K seeds vmapped equal K single runs,
compiled-ahead programs equal jit's, the non-finite policy, seed sharding, the blocks
parameterization on the path users run, and a sweep interrupted by SIGTERM."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopicl import registry, loop, optim, run, schedule, step as step_lib, sweep, train
from tests.test_train import ROOT, tiny_config


def test_sweep_equals_separate_runs(tmp_path):
  """K seeds in one vmapped program end where K single runs (train.py's: the same loop with
  K = 1 and a run directory) end, across a loop-curriculum change (two compiled programs)."""
  overrides = {"train.curriculum_start": 1, "train.curriculum_every": 30, "train.steps": 50}
  seeds = [0, 3]
  result = sweep.train_seeds(tiny_config(**overrides), seeds)
  assert result.diverged_at.tolist() == [-1, -1]
  for k, seed in enumerate(seeds):
    single = tiny_config(**overrides, **{"train.seed": seed})
    train.train_and_evaluate(single, str(tmp_path / f"s{seed}"), log=lambda *a: None, progress=False)
    _, model, step = run.load_trained(str(tmp_path / f"s{seed}"))
    assert step == 50
    for got, want in zip(sweep.seed_model(result, k).weights(), model.weights()):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  a, b = (sweep.seed_params(result, k)["Q_xx"] for k in range(2))
  assert not np.allclose(a, b)  # different seeds really are different runs


def test_seed_sharded_sweep_matches_one_device(tmp_path):
  """On 2 host devices the seed axis is split (no collectives); each seed ends where it ends on 1."""
  overrides = {"train.curriculum_start": 1, "train.curriculum_every": 20, "train.steps": 40}
  code = f"""
import numpy as np, jax
from loopicl import step, sweep
from tests.test_train import tiny_config
assert len(jax.devices()) == 2 and step.seed_mesh(4).devices.size == 2
assert step.seed_mesh(3) is None  # 3 seeds do not split over 2 devices: one device
result = sweep.train_seeds(tiny_config(**{overrides!r}), [0, 1, 2, 3])
np.savez({str(tmp_path / "sharded.npz")!r}, diverged=result.diverged_at, **result.params)
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  sharded = np.load(tmp_path / "sharded.npz")
  single = sweep.train_seeds(tiny_config(**overrides), [0, 1, 2, 3])
  assert sharded["diverged"].tolist() == single.diverged_at.tolist() == [-1] * 4
  for name, leaf in single.params.items():
    np.testing.assert_allclose(sharded[name], leaf, rtol=1e-5, atol=1e-6)


def test_compiled_ahead_programs_equal_jit_chunks():
  """The loop runs the programs `step.compile_ahead` built on worker threads; they are the
  programs jax.jit builds for the same chunks: the same parameters, bit for bit, across a loop
  curriculum (one program per loop count, each compiled once)."""
  config = tiny_config(**{"train.curriculum_start": 1, "train.curriculum_every": 20,
                          "train.steps": 50, "train.steps_per_call": 20})
  seeds = [0, 3]
  result = sweep.train_seeds(config, seeds)
  family = registry.of(config, training=True)
  tx = optim.make_optimizer(config.train)
  plan = schedule.chunk_plan(config)
  assert sorted({(loops, length) for _, length, loops in plan}) == [(1, 20), (2, 10), (2, 20)]  # T = 2
  model_def, states = step_lib.init_states(family, tx, seeds)
  placement = step_lib.Placement.of(len(seeds), int(config.train.batch_size))
  bad = jnp.full((len(seeds),), -1, jnp.int32)
  chunks = {}
  for first, length, loops in plan:
    if loops not in chunks:
      chunks[loops] = step_lib.make_chunk(family, model_def, tx, int(config.train.batch_size),
                                          loops, placement)
    states, bad, _ = chunks[loops](states, bad, jnp.int32(first), length)
  for name, leaf in jax.device_get(states["params"]).items():
    np.testing.assert_array_equal(result.params[name], leaf)
  programs = step_lib.compile_ahead(plan, lambda loops: chunks[loops], states, bad, workers=2)
  assert set(programs) == {(1, 20), (2, 10), (2, 20)}
  assert all(f.result() is not None for f in programs.values())


def test_chunk_plan_cuts_at_events_and_resumes_the_same_way():
  """With events the plan is cut at every evaluation, checkpoint and log step, and the plan
  from a checkpoint step is the tail of the whole plan (so a resumed run groups its steps alike)."""
  config = tiny_config(**{"train.steps": 60, "train.steps_per_call": 25, "train.log_every": 10,
                          "eval.every": 20, "checkpoint.every": 30, "train.curriculum_start": 1,
                          "train.curriculum_every": 15})
  whole = schedule.chunk_plan(config, events=True)
  ends = [first + length for first, length, _ in whole]
  assert ends == [10, 15, 20, 25, 30, 40, 45, 50, 60]
  assert [loops for _, _, loops in whole] == [1, 1, 2, 2, 2, 2, 2, 2, 2]
  assert schedule.chunk_plan(config, events=True, start=30) == [c for c in whole if c[0] >= 30]
  assert schedule.chunk_plan(config) == [(0, 15, 1), (15, 10, 2), (25, 5, 2), (30, 15, 2),
                                         (45, 5, 2), (50, 10, 2)]


def test_a_diverging_seed_freezes_and_does_not_poison_the_others():
  """Lane 1 turns NaN at step 3: it freezes there for good; lane 0 runs as if alone."""
  def step_fn(state, step):
    x = state["x"] * 1.5 + 1.0
    loss = jnp.where((state["lane"] == 1) & (step >= 3), jnp.nan, x)
    return {"x": x, "lane": state["lane"]}, {"loss": loss, "grad_norm": jnp.float32(0.0)}

  chunk = jax.jit(jax.vmap(lambda s, b, first: step_lib.scan_steps(step_fn, s, first, 4, bad=b),
                           in_axes=(0, 0, None)))
  states = {"x": jnp.zeros(2), "lane": jnp.arange(2)}
  bad = jnp.full((2,), -1, jnp.int32)
  for first in (0, 4):  # two chunks: the freeze is carried across chunk boundaries
    states, bad, _ = chunk(states, bad, jnp.int32(first))
  x = 0.0
  for _ in range(8):
    x = x * 1.5 + 1.0
  assert float(states["x"][0]) == pytest.approx(x)  # lane 0: all 8 steps
  assert float(states["x"][1]) == pytest.approx(4.75)  # lane 1: steps 0, 1, 2 only (0 → 1 → 2.5 → 4.75)
  assert bad.tolist() == [-1, 3]


def test_nonfinite_steps_are_skipped_up_to_the_allowed_streak():
  """train.nonfinite_skips = k: a non-finite step leaves the state as it was and the next batch
  trains; k + 1 in a row stop the run at that step (k = 0: the first one, as before)."""
  nonfinite = jnp.array([3, 6, 7])  # step 3 alone, then 6 and 7 in a row

  def step_fn(state, step):
    x = state["x"] * 1.5 + 1.0
    loss = jnp.where(jnp.any(step == nonfinite), jnp.inf, x)
    return {"x": x}, {"loss": loss, "grad_norm": jnp.float32(0.0)}

  def run(max_skips, length=10):
    state, bad, metrics = jax.jit(lambda s: step_lib.scan_steps(step_fn, s, jnp.int32(0), length,
                                                             max_skips=max_skips))({"x": jnp.zeros(())})
    return float(state["x"]), int(bad), np.asarray(metrics["skipped"])

  def numpy_x(steps):
    x = 0.0
    for _ in steps:
      x = x * 1.5 + 1.0
    return x

  x, bad, skipped = run(0)
  assert bad == 3 and x == pytest.approx(numpy_x(range(3)))  # stops at the first, as before
  assert skipped.sum() == 0
  x, bad, skipped = run(1)  # 3 skipped, 6 skipped, 7 is the second in a row: stop there
  assert bad == 7 and x == pytest.approx(numpy_x([0, 1, 2, 4, 5]))
  assert skipped.tolist() == [0, 0, 0, 1, 0, 0, 1, 0, 0, 0]  # the stopping step is not "skipped"
  x, bad, skipped = run(2)  # every non-finite step skipped, the other 7 train
  assert bad == -1 and x == pytest.approx(numpy_x([0, 1, 2, 4, 5, 8, 9]))
  assert skipped.tolist() == [0, 0, 0, 1, 0, 0, 1, 1, 0, 0]


def test_blocks_trains_only_the_construction_blocks_on_the_users_path(tmp_path):
  """model.parameterization = "blocks" (the default) through train_and_evaluate: the parameters
  are P_yy and Q_xx alone (nothing else is in the checkpoint or the optimizer), every other entry
  of the effective (P, Q) is exactly 0 after training, and the blocks moved; "full" from the
  same seed starts equal on the blocks and moves every entry."""
  d = 3
  out = {}
  for param in ("blocks", "full"):
    config = tiny_config(**{"model.parameterization": param, "train.steps": 20})
    init = step_lib.init_state(registry.of(config), optim.make_optimizer(config.train), 0)[1]
    train.train_and_evaluate(config, str(tmp_path / param), log=lambda *a: None, progress=False)
    _, model, _ = run.load_trained(str(tmp_path / param))
    out[param] = (init["params"], [np.asarray(w) for w in model.weights()])
  init, (P, Q) = out["blocks"]
  assert sorted(init) == ["P_yy", "Q_xx"] and init["Q_xx"].shape == (d, d) and init["P_yy"].shape == (1, 1)
  off_P, off_Q = np.ones_like(P, bool), np.ones_like(Q, bool)
  off_P[d:, d:], off_Q[:d, :d] = False, False
  assert np.all(P[off_P] == 0) and np.all(Q[off_Q] == 0)          # constants, bit for bit
  assert np.abs(Q[:d, :d] - np.asarray(init["Q_xx"])).max() > 1e-3  # the blocks trained
  full_init, (P_full, Q_full) = out["full"]
  np.testing.assert_array_equal(np.asarray(full_init["Q"])[:d, :d], np.asarray(init["Q_xx"]))
  np.testing.assert_array_equal(np.asarray(full_init["P"])[d:, d:], np.asarray(init["P_yy"]))
  moved = np.abs(Q_full - np.asarray(full_init["Q"]))
  assert moved[off_Q].max() > 1e-4  # "full" trains the off-blocks too: nothing masked


def test_a_sweep_stopped_by_sigterm_saves_every_seed_and_resumes_bit_identical(tmp_path):
  """The signal policy is the loop's, so a sweep point has it too: SIGTERM saves a checkpoint
  for every seed at the end of the chunk and returns `interrupted`; the rerun ends where an
  uninterrupted sweep ends, bit for bit."""
  import signal
  config = tiny_config(**{"train.steps": 40})
  seeds = [0, 1]
  ref = loop.train(config, seeds, [str(tmp_path / "ref" / f"s{s}") for s in seeds], log=lambda *a: None)
  dirs = [str(tmp_path / "cut" / f"s{s}") for s in seeds]

  class Signalled(loop.RunDir):
    def save(self, step, state):
      super().save(step, state)
      if step == 20 and self.workdir == dirs[0]:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the loop runs: handled after the chunk

  original = loop.RunDir
  loop.RunDir = Signalled
  try:
    cut = loop.train(config, seeds, dirs, log=lambda *a: None)
  finally:
    loop.RunDir = original
  assert cut.interrupted == "SIGTERM" and cut.step == 20
  assert [sorted(os.listdir(os.path.join(d, "checkpoints"))) for d in dirs] == [["20"], ["20"]]
  resumed = loop.train(config, seeds, dirs, log=lambda *a: None)
  assert resumed.step == 40 and resumed.interrupted is None
  for name in ref.params:
    np.testing.assert_array_equal(resumed.params[name], ref.params[name])
