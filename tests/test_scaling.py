"""Speed and scale: data parallelism, remat, the two attention forms, multi-host, the benchmark.

The device count is fixed when JAX starts, so anything on several devices runs in a subprocess
(this process has the host's one device).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopicl import run, train
from loopicl.experiments import benchmark
from loopicl.linear.model import loop_readouts
from tests.test_train import DEFAULT_CONFIG, ROOT, TINY_OVERRIDES, tiny_config


def _python(code: str, env: dict, timeout: float = 300):
  """Runs `code` in a fresh interpreter (own device count); returns the parsed last stdout line."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env)
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=full_env, timeout=timeout, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


_SHORT_RUN = """
  import json, jax, jax.numpy as jnp, numpy as np
  from loopicl import config as config_lib, distributed, registry, optim, run, step, train
  from tests.test_train import tiny_config

  def short_run(steps=20, per_call=5):
    \"\"\"The training loop's own pieces (one seed): init, placement, jitted chunks.\"\"\"
    config = tiny_config(**{"train.batch_size": 16})
    family = registry.of(config, training=True)
    tx = optim.make_optimizer(config.train)
    model_def, states = step.init_states(family, tx, [config.train.seed])
    placement = step.Placement.of(1, 16)
    states, bad = placement.place((states, jnp.full((1,), -1, jnp.int32)))
    chunk = step.make_chunk(family, model_def, tx, 16, int(config.model.loops), placement)
    losses = []
    for first in range(0, steps, per_call):
      states, bad, metrics = chunk(states, bad, jnp.int32(first), per_call)
      assert int(bad[0]) < 0
      losses += np.asarray(metrics["loss"][0]).tolist()
    params = {k: np.asarray(distributed.host_value(v))[0].tolist() for k, v in states["params"].items()}
    return {"devices": jax.device_count(), "losses": losses, "params": params,
            "sharding": str(states["params"]["Q_xx"].sharding)}
"""


@pytest.fixture(scope="module")
def four_device_child(tmp_path_factory):
  """One fresh process (JAX starts once per process, so share it): config.cpu_devices=4 and
  LOOPICL_DISTRIBUTED=1 with a local coordinator; a short run of jitted chunks, a refused
  uneven batch, then train_and_evaluate end to end with checkpoints."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  workdir = str(tmp_path_factory.mktemp("dist") / "run")
  out = _python(_SHORT_RUN + f"""
  config = tiny_config(**{{"train.steps": 20, "checkpoint.every": 10, "eval.every": 20}})
  config.cpu_devices = 4
  distributed.maybe_initialize(config)  # first thing: nothing has started JAX yet
  out = short_run()
  try:
    step.Placement.of(1, 18)
  except config_lib.ConfigError as e:
    out["refused"] = str(e)
  result = train.train_and_evaluate(config, {workdir!r}, log=lambda *a: None, progress=False)
  _, model, step = run.load_trained({workdir!r})
  out.update(initialized=jax.distributed.is_initialized(), processes=jax.process_count(),
             step=step, test_error=result["test_error"])
  print(json.dumps(out))
  """, {"LOOPICL_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "LOOPICL_NUM_PROCESSES": "1", "LOOPICL_PROCESS_ID": "0"})
  return out, workdir


def test_sharded_run_matches_single_device(four_device_child):
  """4 devices (batch split 4 ways, state replicated) == 1 device, to float rounding."""
  four, _ = four_device_child
  assert four["devices"] == 4 and "NamedSharding" in four["sharding"]
  assert four["refused"].startswith("config.train.batch_size=18 is invalid on 4 devices; allowed:")
  scope = {}
  exec(textwrap.dedent(_SHORT_RUN), scope)
  one = scope["short_run"]()
  assert one["devices"] == 1
  np.testing.assert_allclose(one["losses"], four["losses"], rtol=1e-4)
  for k in one["params"]:
    np.testing.assert_allclose(one["params"][k], four["params"][k], rtol=1e-4, atol=1e-6)


def test_single_process_distributed_initialize(four_device_child):
  """jax.distributed came up (1 process), train_and_evaluate trained on the 4 devices, process 0
  wrote the logs, and the replicated state went through Orbax's multi-host save and restored."""
  out, workdir = four_device_child
  assert out["initialized"] and out["processes"] == 1
  assert out["step"] == 20 and np.isfinite(out["test_error"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  for name in ("config.json", "metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, name))


@pytest.mark.slow  # three training processes (~60–90 s on 2 cores): the default run's 10-min budget
def test_two_processes_match_one_process_on_two_devices(tmp_path):
  """Multi-host for real, on one machine: two processes joined by jax.distributed (one CPU device
  each, Gloo collectives) train the batch split over both — the same numbers as one process on
  2 host devices; only process 0 writes logs; Orbax writes and restores the checkpoints."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  overrides = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()] + [
      "--config.train.steps=30", "--config.checkpoint.every=15", "--config.eval.every=15"]
  def train_cmd(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={DEFAULT_CONFIG}",
            f"--workdir={workdir}", *overrides, *extra]
  multi = tmp_path / "two_processes"
  procs = [subprocess.Popen(train_cmd(multi, "--config.distributed=True"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu",
                                     JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     LOOPICL_NUM_PROCESSES="2", LOOPICL_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  single = tmp_path / "one_process"
  out = subprocess.run(train_cmd(single, "--config.cpu_devices=2"), cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = {w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
           for w in (multi, single)}
  assert [l["step"] for l in lines[multi]] == [15, 30]      # written once, by process 0
  for a, b in zip(lines[multi], lines[single]):
    for key in ("train_loss", "test_error"):
      assert a[key] == pytest.approx(b[key], rel=1e-5), key
  assert len([f for f in os.listdir(multi) if f.startswith("events.out.tfevents")]) == 1
  assert sorted(os.listdir(multi / "checkpoints")) == ["15", "30"]
  _, model, step = run.load_trained(str(multi))
  _, model_single, _ = run.load_trained(str(single))
  assert step == 30
  for w, w_single in zip(model.weights(), model_single.weights()):
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_single), rtol=1e-5, atol=1e-7)


def _loss(P, Q, Z0, targets, *, form="reassociated", remat=False, loops=4):
  readouts = loop_readouts(P, Q, Z0, loops=loops, d_out=targets.shape[-2],
                           n_queries=targets.shape[-1], form=form, remat=remat)
  return jnp.mean(jnp.square(readouts - targets))  # every loop's read-out: gradients through all


def _problem(d=4, d_out=2, n=9, m=3, batch=5, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  D = d + d_out
  P = 0.3 * jax.random.normal(ks[0], (D, D))
  Q = 0.3 * jax.random.normal(ks[1], (D, D))
  Z0 = jax.random.normal(ks[2], (batch, D, n + m)).at[:, d:, n:].set(0.0)
  targets = jax.random.normal(ks[3], (batch, d_out, m))
  return P, Q, Z0, targets


@pytest.mark.parametrize("variant", [{"remat": True}, {"form": "textbook"}])
def test_gradients_match_the_plain_form(variant):
  """remat and the textbook form change how the gradient is computed, never its value."""
  with jax.enable_x64(True):
    P, Q, Z0, targets = (x.astype(jnp.float64) for x in _problem())
    grad = jax.grad(_loss, argnums=(0, 1))
    plain = grad(P, Q, Z0, targets)
    other = grad(P, Q, Z0, targets, **variant)
    for a, b in zip(plain, other):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-13)


def test_model_form_reaches_the_training_step():
  """The benchmark's textbook row really trains the textbook form (same numbers, other graph)."""
  c = tiny_config()
  for form in ("reassociated", "textbook"):
    chunk, state, family, model_def, tx = benchmark.build(c, form)
    assert model_def.merge(state["params"]).form == form


def test_step_flops_match_the_papers_count():
  """The issue's figure: batch 256, d = 20, n = 40, T = 10 is ≈ 0.84 GFLOP per step."""
  c = tiny_config(**{"task.d": 20, "task.n_context": 40, "model.loops": 10,
                     "train.batch_size": 256})
  assert benchmark.step_flops(c) == pytest.approx(0.84e9, rel=0.02)
  # The textbook form is O(n²·D): at n = 1000 it needs ≫ the reassociated form's FLOPs.
  big = tiny_config(**{"task.n_context": 1000})
  assert benchmark.step_flops(big, "textbook") > 20 * benchmark.step_flops(big, "reassociated")


def test_benchmark_json_contract():
  """scripts/benchmark.py --json: the last line is one JSON object with the contract keys."""
  flags = [f"--config={DEFAULT_CONFIG}", "--json", "--repeats=1", "--xla_flops=false"] + [
      f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, "train.steps_per_call": 2}.items()]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *flags],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for key in benchmark.CONTRACT_KEYS:
    assert isinstance(result[key], (int, float)) and result[key] > 0, key
  assert result["examples_per_s"] == pytest.approx(16 * result["steps_per_s"])
  assert result["flops_per_step"] == benchmark.step_flops(tiny_config())
  assert "steps/s" in out.stdout and "textbook" in out.stdout  # the table came first
  # One CPU device: "auto" runs the fused kernel, and the plain XLA step is timed beside it.
  assert result["kernel"] == "cpu" and result["xla_kernel_steps_per_s"] > 0
  assert "reassociated/cpu" in out.stdout and "reassociated/xla" in out.stdout


def test_benchmark_refuses_bad_flags_in_one_line():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"),
                        f"--config={DEFAULT_CONFIG}", "--config.cpu_devices=-1"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: config.cpu_devices=-1 is invalid")


@pytest.mark.slow
def test_long_sharded_run_does_not_abort():
  """75 s of back-to-back sharded chunks on 2 host devices, one step each (the most dispatches
  per second), outlast XLA's 60 s rendezvous timeout: without the wait for each chunk
  (distributed.block) such a loop aborted the process after 60 s with jax 0.10.2."""
  out = _python("""
    import json, time, jax, jax.numpy as jnp
    from loopicl import optim, registry, step as step_lib
    from tests.test_train import tiny_config
    config = tiny_config(**{"train.batch_size": 16})
    family = registry.of(config, training=True)
    tx = optim.make_optimizer(config.train)
    model_def, states = step_lib.init_states(family, tx, [config.train.seed])
    placement = step_lib.Placement.of(1, 16)
    states, bad = placement.place((states, jnp.full((1,), -1, jnp.int32)))
    chunk = step_lib.make_chunk(family, model_def, tx, 16, 2, placement)
    start, step = time.time(), 0
    while time.time() - start < 75:
      states, bad, metrics = chunk(states, bad, jnp.int32(step), 1)
      step += 1
    print(json.dumps({"devices": jax.device_count(), "steps": step, "seconds": time.time() - start,
                      "finite": bool(jnp.isfinite(metrics["loss"]).all())}))
  """, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
  assert out["devices"] == 2 and out["seconds"] > 60 and out["steps"] > 100 and out["finite"]


@pytest.mark.slow
def test_benchmark_modes(tmp_path):
  flags = [f"--config={DEFAULT_CONFIG}", "--json", "--repeats=1", "--naive=false",
           "--xla_flops=false", "--n_scaling", "--scaling_ns=8,64", "--remat_memory",
           "--fake_devices=1,2", "--config.train.steps_per_call=2", "--config.train.batch_size=8"]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *flags],
                       capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r["n"] for r in result["n_scaling"]] == [8, 64]
  assert all(r["textbook_seconds_per_step"] > 0 for r in result["n_scaling"])
  no_remat, remat = result["remat_memory"]
  assert remat["temp_bytes"] < no_remat["temp_bytes"]
  assert [r["devices"] for r in result["fake_devices"]] == [1, 2]
  # "auto": the fused kernel on one device, the data-parallel XLA path on two.
  assert [r["kernel"] for r in result["fake_devices"]] == ["cpu", "xla"]
