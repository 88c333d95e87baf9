"""Comparing learned weights with the GD construction (docs/theory.md §2–3).

The looped transformer's function depends on (P, Q) only up to the symmetry (P, Q) → (cP, Q/c):
every loop computes P · (Z M Zᵀ) · Q · Z, which is bilinear in (P, Q).  So we compare the
Kronecker product P ⊗ Q, which the symmetry leaves unchanged, and never form it (D⁴ entries):
⟨P⊗Q, R⊗S⟩ = ⟨P, R⟩⟨Q, S⟩ and ||P⊗Q|| = ||P||·||Q||.

The GD construction with step η is P = E, Q = −η F with E = [[0,0],[0,I_dout]], F = [[I_d,0],[0,0]],
so the plain-GD family is the line {η · G}, G = E ⊗ (−F).  Preconditioned GD (any A) puts P⊗Q in
the block E ⊗ (top-left d × d block of Q).

The construction at the learned scale.  To draw learned weights beside the construction, or to
walk the straight line between them, the construction (P_C, Q_C) at step η is first moved along
its symmetry orbit to the point nearest the learned weights: c minimizes
||P_L − cP_C||² + ||Q_L − Q_C/c||², a root of the quartic p·c⁴ − a·c³ + b·c − q = 0
(a = ⟨P_L, P_C⟩, b = ⟨Q_L, Q_C⟩, p = ||P_C||², q = ||Q_C||²).  `construction_at_learned_scale`
is the one rule: TensorBoard's heatmaps and the evaluation report both use it.

All functions but those two take P, Q: [D, D] (D = d + d_out) and are jit-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _blocks(P, Q, d_out):
  d = P.shape[-1] - d_out
  return P[..., d:, d:], Q[..., :d, :d]


def gd_step_equivalent(P: jax.Array, Q: jax.Array, d_out: int) -> jax.Array:
  """η̂: the step of the plain-GD construction nearest to (P, Q) in the P ⊗ Q sense.

  η̂ = ⟨P⊗Q, G⟩ / ||G||² = ⟨P, E⟩⟨Q, −F⟩ / (d_out · d), i.e. −tr(P_yy)·tr(Q_xx) / (d_out·d).
  """
  p_yy, q_xx = _blocks(P, Q, d_out)
  d = q_xx.shape[-1]
  return -jnp.trace(p_yy, axis1=-2, axis2=-1) * jnp.trace(q_xx, axis1=-2, axis2=-1) / (d_out * d)


def weight_distance(P: jax.Array, Q: jax.Array, d_out: int) -> jax.Array:
  """Scale-invariant distance to the nearest plain-GD construction, in [0, 1].

  ||P⊗Q − η̂ G||_F / ||P⊗Q||_F: the relative Frobenius distance after the best rescaling (the
  sine of the angle between P ⊗ Q and the GD line).  0 iff (P, Q) = (cE, −(η/c)F) for some c, η;
  invariant to (P, Q) → (cP, Q/c).  A preconditioned construction with A ≠ η·I is at distance > 0:
  `offblock_fraction` and `implied_preconditioner` tell the two cases apart.
  """
  eta = gd_step_equivalent(P, Q, d_out)
  d = P.shape[-1] - d_out
  norm2 = jnp.sum(P * P, axis=(-2, -1)) * jnp.sum(Q * Q, axis=(-2, -1))
  # ||P⊗Q − ηG||² = ||P⊗Q||² − 2η⟨P⊗Q, G⟩ + η²||G||², and ⟨P⊗Q, G⟩ = η̂ ||G||² at the optimum.
  residual2 = jnp.maximum(norm2 - eta ** 2 * (d_out * d), 0.0)
  return jnp.sqrt(residual2 / norm2)


def offblock_fraction(P: jax.Array, Q: jax.Array, d_out: int) -> jax.Array:
  """Fraction of ||P⊗Q|| outside the construction's non-zero blocks (P_yy ⊗ Q_xx), in [0, 1].

  sqrt(1 − ||P_yy||²·||Q_xx||² / (||P||²·||Q||²)); 0 for every (preconditioned) GD construction.
  """
  p_yy, q_xx = _blocks(P, Q, d_out)
  inside = jnp.sum(p_yy * p_yy, axis=(-2, -1)) * jnp.sum(q_xx * q_xx, axis=(-2, -1))
  total = jnp.sum(P * P, axis=(-2, -1)) * jnp.sum(Q * Q, axis=(-2, -1))
  return jnp.sqrt(jnp.maximum(1.0 - inside / total, 0.0))


def implied_preconditioner(P: jax.Array, Q: jax.Array, d_out: int) -> jax.Array:
  """Â = −(tr P_yy / d_out) · Q_xx: [d, d], the preconditioner of the nearest construction.

  For d_out = 1 this is p·A' of docs/theory.md §3; for the GD construction with preconditioner A it
  returns A exactly (so η·I for plain GD).  Invariant to (P, Q) → (cP, Q/c).
  """
  p_yy, q_xx = _blocks(P, Q, d_out)
  return -(jnp.trace(p_yy, axis1=-2, axis2=-1) / d_out)[..., None, None] * q_xx


def matrix_cosine(A: jax.Array, B: jax.Array) -> jax.Array:
  """⟨A, B⟩_F / (||A||·||B||): 1 iff A = cB with c > 0."""
  num = jnp.sum(A * B, axis=(-2, -1))
  return num / jnp.sqrt(jnp.sum(A * A, axis=(-2, -1)) * jnp.sum(B * B, axis=(-2, -1)))


def relative_distance_after_scaling(A: jax.Array, B: jax.Array) -> jax.Array:
  """min_c ||A − cB|| / ||A||: how far A is from the line through B (= sin of their angle)."""
  cos = matrix_cosine(A, B)
  return jnp.sqrt(jnp.maximum(1.0 - cos ** 2, 0.0))


def nearest_on_orbit(P_learned, Q_learned, P_c, Q_c) -> float:
  """c minimizing ||P_L − c·P_C||² + ||Q_L − Q_C/c||² over real c ≠ 0 (module docstring)."""
  PL, QL, PC, QC = (np.asarray(x, np.float64) for x in (P_learned, Q_learned, P_c, Q_c))
  a, b = float(np.sum(PL * PC)), float(np.sum(QL * QC))
  p, q = float(np.sum(PC * PC)), float(np.sum(QC * QC))
  if not all(np.isfinite([a, b, p, q])) or p == 0 or q == 0:
    return 1.0
  roots = np.roots([p, -a, 0.0, b, -q])
  candidates = [r.real for r in roots if abs(r.imag) <= 1e-6 * max(1.0, abs(r)) and r.real != 0]

  def f(c):
    return p * c * c - 2 * a * c + q / (c * c) - 2 * b / c
  # p c⁴ + … − q has a real root of each sign (value −q < 0 at 0, → +∞ at ±∞), so never empty.
  return float(min(candidates, key=f)) if candidates else 1.0


def construction_at_learned_scale(P, Q, d_out: int, step_size: float):
  """(c·P_C, Q_C/c, c): the plain-GD construction with `step_size`, moved along its symmetry
  orbit to the point nearest the learned (P, Q) (module docstring).  float64 numpy."""
  P, Q = np.asarray(P, np.float64), np.asarray(Q, np.float64)
  D = P.shape[-1]
  d = D - d_out
  P_c, Q_c = np.zeros((D, D)), np.zeros((D, D))
  P_c[d:, d:] = np.eye(d_out)
  Q_c[:d, :d] = -float(step_size) * np.eye(d)
  c = nearest_on_orbit(P, Q, P_c, Q_c)
  return c * P_c, Q_c / c, c
