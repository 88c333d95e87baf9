"""SOAP (loopicl/soap.py) against a float64 numpy transcription of its update rule, its rotation
equivariance (why it is there: Adam has none), and the path users run (train.optimizer=soap)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from loopicl import soap
from loopicl.errors import ConfigError


def numpy_soap(grads, b1, b2, decay, eps, every, lr, carry=True):
  """SOAP's updates for one matrix leaf, float64, written from the algorithm (Vyas et al. 2024,
  with the authors' first step that only seeds the factors)."""
  m, n = grads[0].shape
  M, V = np.zeros((m, n)), np.zeros((m, n))
  L, R = np.zeros((m, m)), np.zeros((n, n))
  UL, UR = np.eye(m), np.eye(n)
  out = []
  for k, G in enumerate(grads):
    if k == 0:
      out.append(np.zeros((m, n)))
    else:
      M = b1 * M + (1 - b1) * G
      V = b2 * V + (1 - b2) * (UL.T @ G @ UR) ** 2
      D = (UL.T @ M @ UR / (1 - b1 ** k)) / (np.sqrt(V / (1 - b2 ** k)) + eps)
      out.append(-lr * UL @ D @ UR.T)
    L = decay * L + (1 - decay) * G @ G.T
    R = decay * R + (1 - decay) * G.T @ G
    if k % every == 0:  # new bases; V carried over by the squared rotation between them
      NL, NR = np.linalg.eigh(L)[1], np.linalg.eigh(R)[1]
      if carry:
        V = (NL.T @ UL) ** 2 @ V @ ((NR.T @ UR) ** 2).T
      UL, UR = NL, NR
  return out


def run_soap(tx, grads):
  """Feeds `grads` (a list of pytrees) through `tx`; returns the list of updates."""
  state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
  step = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = step(g, state)
    out.append(u)
  return out


def test_soap_matches_numpy_reference_and_adam_on_vectors():
  rng = np.random.default_rng(0)
  # Gradients with a fixed anisotropic geometry (so the eigenbases settle) plus noise.
  A, B = rng.normal(size=(5, 5)), rng.normal(size=(4, 4))
  grads = [A @ rng.normal(size=(5, 4)) @ B for _ in range(23)]
  vecs = [rng.normal(size=3) for _ in range(23)]
  kw = dict(b1=0.9, b2=0.99, shampoo_decay=0.95, eps=1e-6, precondition_every=4)
  tx = soap.soap(1e-2, **kw)
  got = run_soap(tx, [{"W": jnp.asarray(g, jnp.float32), "b": jnp.asarray(v, jnp.float32)}
                      for g, v in zip(grads, vecs)])
  want = numpy_soap(grads, 0.9, 0.99, 0.95, 1e-6, 4, 1e-2)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g["W"], np.float64), w, rtol=2e-3, atol=2e-6)
  # A vector leaf gets Adam, with the same b1, b2, eps.
  adam = run_soap(optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-6), [jnp.asarray(v, jnp.float32) for v in vecs])
  for g, a in zip(got, adam):
    np.testing.assert_allclose(np.asarray(g["b"]), np.asarray(a), rtol=1e-5, atol=1e-8)


def test_soap_is_rotation_equivariant_adam_is_not():
  """Gradients G_t and U G_t Vᵀ (a rotated problem) give updates u_t and U u_t Vᵀ under SOAP."""
  rng = np.random.default_rng(1)
  S = np.diag(np.geomspace(1.0, 30.0, 6))  # anisotropic, distinct eigenvalues
  grads = [S @ rng.normal(size=(6, 6)) @ S for _ in range(15)]
  U = np.linalg.qr(rng.normal(size=(6, 6)))[0]
  Vr = np.linalg.qr(rng.normal(size=(6, 6)))[0]
  rotated = [U @ g @ Vr.T for g in grads]
  as32 = lambda gs: [jnp.asarray(g, jnp.float32) for g in gs]
  for tx, equivariant in ((soap.soap(1e-2, precondition_every=3), True), (optax.adam(1e-2), False)):
    plain, rot = run_soap(tx, as32(grads)), run_soap(tx, as32(rotated))
    err = max(np.abs(U @ np.asarray(p) @ Vr.T - np.asarray(r)).max() / np.abs(np.asarray(r)).max()
              for p, r in zip(plain[1:], rot[1:]))  # SOAP's first update is 0
    if equivariant:
      assert err < 1e-3, err
    else:
      assert err > 0.05, err


def test_second_moment_follows_its_direction_when_eigenvalues_cross():
  """Two gradient directions swap sizes (1000x) at step 30, so eigh's ascending columns swap at
  the next basis refresh: V must move with its direction, or the now-large direction meets the
  other's small V and takes a step of several lr (4.2 lr in the reference without the carry).
  With it every update stays < 2 lr, as Adam's would."""
  lr = 1e-2
  grads = [np.diag([1.0, 1e-3] if t < 30 else [1e-3, 1.0]) for t in range(60)]
  kw = dict(b2=0.99, shampoo_decay=0.5, precondition_every=5)  # bases follow within a few steps
  got = run_soap(soap.soap(lr, **kw), [jnp.asarray(g, jnp.float32) for g in grads])
  biggest = max(float(np.abs(np.asarray(u)).max()) for u in got) / lr
  assert biggest < 2.0, biggest
  want = numpy_soap(grads, 0.9, 0.99, 0.5, 1e-8, 5, lr)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-3, atol=1e-6)
  bare = numpy_soap(grads, 0.9, 0.99, 0.5, 1e-8, 5, lr, carry=False)
  assert max(float(np.abs(u).max()) for u in bare) / lr > 3.0  # the premise: the swap matters


def test_a_run_with_soap_learns_on_the_blocks(tmp_path):
  """The path users run (train_and_evaluate, model.parameterization = "blocks") with
  train.optimizer=soap (the default): it trains to the end, learns, differs from the Adam run,
  and every entry outside P_yy, Q_xx is exactly 0 (they are not parameters)."""
  from tests.test_train import _final_params, _metrics_lines, _run, tiny_config
  _run(tiny_config(**{"train.optimizer": "adam"}), tmp_path / "adam")
  out = _run(tiny_config(**{"train.optimizer": "soap"}), tmp_path / "soap")
  step_a, p_a = _final_params(tmp_path / "adam")
  step_s, p_s = _final_params(tmp_path / "soap")
  assert step_a == step_s == out["step"]
  assert all(np.all(np.isfinite(v)) for v in p_s.values())
  assert not np.allclose(p_a["Q"], p_s["Q"])
  lines = [json.loads(l) for l in _metrics_lines(tmp_path / "soap")]
  assert lines[-1]["test_error"] < 0.85 * lines[0]["test_error"]  # it learns (measured 0.75×)
  d = tiny_config().task.d
  off_P, off_Q = np.ones(p_s["P"].shape, bool), np.ones(p_s["Q"].shape, bool)
  off_P[d:, d:], off_Q[:d, :d] = False, False
  assert np.all(p_s["P"][off_P] == 0) and np.all(p_s["Q"][off_Q] == 0)


def test_soap_config_errors_are_one_line():
  cfg = default.get_config()
  cfg.train.shampoo_decay = 1.0
  from loopicl import config as config_lib
  with pytest.raises(ConfigError, match=r"train\.shampoo_decay"):
    config_lib.validate(cfg)
  cfg = default.get_config()
  cfg.train.precondition_every = 0
  with pytest.raises(ConfigError, match=r"train\.precondition_every"):
    config_lib.validate(cfg)
