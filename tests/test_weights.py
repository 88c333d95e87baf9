"""Weight-space comparisons against explicit Kronecker products in numpy float64."""
import jax
import numpy as np
import pytest

from loopicl.linear import construction, weights


def _np_distance(P, Q, d, d_out):
  """min_η ||P⊗Q − η E⊗(−F)|| / ||P⊗Q||, with the Kronecker products formed explicitly."""
  D = d + d_out
  E = np.zeros((D, D)); E[d:, d:] = np.eye(d_out)
  F = np.zeros((D, D)); F[:d, :d] = np.eye(d)
  K, G = np.kron(P, Q), np.kron(E, -F)
  etas = np.array([np.sum(K * G) / np.sum(G * G)])
  return np.linalg.norm(K - etas[0] * G) / np.linalg.norm(K), etas[0]


@pytest.mark.parametrize("d,d_out", [(4, 1), (3, 2)])
def test_distance_zero_on_construction_and_invariant(d, d_out):
  with jax.enable_x64(True):
    P, Q = (np.asarray(w) for w in construction.gd_params(d, d_out, step_size=0.7))
    assert float(weights.weight_distance(P, Q, d_out)) < 1e-7
    assert abs(float(weights.gd_step_equivalent(P, Q, d_out)) - 0.7) < 1e-12
    np.testing.assert_allclose(weights.implied_preconditioner(3 * P, Q / 3, d_out), 0.7 * np.eye(d), atol=1e-12)
    assert float(weights.offblock_fraction(P, Q, d_out)) < 1e-7
    rng = np.random.default_rng(0)
    prev = 0.0
    for eps in [1e-3, 1e-2, 1e-1, 1.0]:
      Pp = P + eps * rng.standard_normal(P.shape)
      Qp = Q + eps * rng.standard_normal(Q.shape)
      dist = float(weights.weight_distance(Pp, Qp, d_out))
      expected, eta = _np_distance(Pp, Qp, d, d_out)
      assert abs(dist - expected) < 1e-10 and dist > prev
      assert abs(float(weights.gd_step_equivalent(Pp, Qp, d_out)) - eta) < 1e-10
      # The (cP, Q/c) symmetry changes nothing.
      assert abs(float(weights.weight_distance(-2.5 * Pp, Qp / -2.5, d_out)) - dist) < 1e-12
      prev = dist


def test_preconditioned_construction_is_on_block_but_off_line():
  with jax.enable_x64(True):
    A = np.diag([1.0, 0.5, 0.25])
    P, Q = (np.asarray(w) for w in construction.gd_params(3, 1, preconditioner=A))
    assert float(weights.offblock_fraction(P, Q, 1)) < 1e-7
    assert float(weights.weight_distance(P, Q, 1)) > 0.1
    np.testing.assert_allclose(weights.implied_preconditioner(P, Q, 1), A, atol=1e-12)
    inv = np.linalg.inv(A)
    assert abs(float(weights.matrix_cosine(A, inv)) - np.sum(A * inv) / np.linalg.norm(A) / np.linalg.norm(inv)) < 1e-12
    assert float(weights.relative_distance_after_scaling(A, 3 * A)) < 1e-7
