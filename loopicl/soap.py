"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024), as an optax
transformation.  `train.optimizer = "soap"` (configs/default.py; docs/learning.md).

Why loopicl needs it: Adam rescales each *coordinate* of Q_xx, which is the right thing only when
Σ's eigenbasis is the coordinate basis.  The same recipe that learns Σ⁻¹ to 0.43× PGD's error at
κ_Σ = 100 with an axis-aligned Σ ends 1.12× above PGD with a rotated one (n/d = 4, T = 10) and
~500× above at n/d = 8, T = 20.  SOAP keeps, per matrix W with gradient G [m, n],

  M ← β₁·M + (1 − β₁)·G                                            (momentum, parameter basis)
  V ← β₂·V + (1 − β₂)·(U_Lᵀ G U_R)²                                (Adam's second moment, rotated)
  update = U_L [ (U_Lᵀ M U_R / (1 − β₁ᵗ)) / (√(V / (1 − β₂ᵗ)) + ε) ] U_Rᵀ
  L ← β_s·L + (1 − β_s)·G Gᵀ,   R ← β_s·R + (1 − β_s)·Gᵀ G        (Shampoo's factors)
  U_L, U_R = eigenvectors of L, R  (recomputed every `precondition_every` steps)
  V ← (R_L∘R_L) V (R_R∘R_R)ᵀ,  R = U_newᵀ U_old                     (on each recompute)

(V carried into the new basis: exact for the reorderings and sign flips `eigh` makes when two
eigenvalues cross — its columns come in ascending order — where V's entries would otherwise land
on other directions, and a direction with a small V and a large gradient takes a huge step; the
authors re-sort V by the new basis's eigenvalue estimates for the same reason), so it is Adam in
a basis that follows the gradient's own geometry — for Q_xx, Σ's eigenbasis —
and an axis-aligned and a rotated Σ train alike.  Leaves that are not matrices get plain Adam.
The learning rate is applied by the caller (`optax.scale_by_learning_rate`), as for Adam.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class SoapState(NamedTuple):
  count: jax.Array   # steps taken, int32 []
  mu: optax.Updates  # momentum M, parameter basis
  nu: optax.Updates  # second moment V, rotated basis
  left: optax.Updates   # L [m, m] per matrix leaf (a [1] placeholder for other leaves)
  right: optax.Updates  # R [n, n]
  basis_left: optax.Updates   # U_L [m, m]
  basis_right: optax.Updates  # U_R [n, n]


def _is_matrix(x) -> bool:
  return jnp.ndim(x) == 2


def scale_by_soap(b1: float = 0.9, b2: float = 0.999, shampoo_decay: float = 0.99,
                  eps: float = 1e-8, precondition_every: int = 10) -> optax.GradientTransformation:
  """The SOAP direction (lr not applied).  `shampoo_decay` is β_s; the eigenbases are recomputed
  (jnp.linalg.eigh) after the first step and every `precondition_every` steps after that.  A
  matrix's first update is 0 (the first gradient seeds L, R); t counts its updates after that."""
  if precondition_every < 1:
    raise ValueError(f"precondition_every must be >= 1, got {precondition_every}")

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)
    # Other leaves hold a [1] placeholder, not [0]: Orbax cannot save zero-size arrays.
    square = lambda k: (lambda p: jnp.zeros((p.shape[k], p.shape[k]), p.dtype)
                        if _is_matrix(p) else jnp.zeros([1], p.dtype))
    eye = lambda k: (lambda p: jnp.eye(p.shape[k], dtype=p.dtype)
                     if _is_matrix(p) else jnp.zeros([1], p.dtype))
    return SoapState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                     jax.tree.map(zeros, params), jax.tree.map(square(0), params),
                     jax.tree.map(square(1), params), jax.tree.map(eye(0), params),
                     jax.tree.map(eye(1), params))

  def update_fn(updates, state, params=None):
    del params
    # The first gradient only seeds the factors and the first basis (as the SOAP authors do): in
    # the basis of its own GGᵀ, GᵀG a gradient is diagonal, and Adam's first step, ~sign(·),
    # would blow its round-off entries up to full size.  (The warm-up's lr is 0 there anyway.)
    first = state.count == 0
    refresh = (state.count % precondition_every) == 0
    t = jnp.maximum(state.count, 1).astype(jnp.float32)  # updates taken by matrices, this one incl.
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    tv = (state.count + 1).astype(jnp.float32)           # by other leaves (plain Adam)
    c1v, c2v = 1 - b1 ** tv, 1 - b2 ** tv

    def leaf(g, mu, nu, left, right, ul, ur):
      if not _is_matrix(g):  # Adam
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        return (mu / c1v) / (jnp.sqrt(nu / c2v) + eps), mu, nu, left, right, ul, ur
      g_rot = ul.T @ g @ ur  # in the basis of the factors *before* this gradient
      mu = jnp.where(first, mu, b1 * mu + (1 - b1) * g)
      nu = jnp.where(first, nu, b2 * nu + (1 - b2) * g_rot * g_rot)
      direction = ((ul.T @ mu @ ur) / c1) / (jnp.sqrt(nu / c2) + eps)
      update = jnp.where(first, jnp.zeros_like(g), ul @ direction @ ur.T)
      left = shampoo_decay * left + (1 - shampoo_decay) * g @ g.T
      right = shampoo_decay * right + (1 - shampoo_decay) * g.T @ g
      def refreshed():
        new_l, new_r = jnp.linalg.eigh(left)[1], jnp.linalg.eigh(right)[1]
        rot_l, rot_r = new_l.T @ ul, new_r.T @ ur   # old basis vectors in the new basis
        return new_l, new_r, (rot_l * rot_l) @ nu @ (rot_r * rot_r).T
      ul, ur, nu = jax.lax.cond(refresh, refreshed, lambda: (ul, ur, nu))
      return update, mu, nu, left, right, ul, ur

    out = jax.tree.map(leaf, updates, state.mu, state.nu, state.left, state.right,
                       state.basis_left, state.basis_right)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
    return pick(0), SoapState(state.count + 1, pick(1), pick(2), pick(3), pick(4), pick(5), pick(6))

  return optax.GradientTransformation(init_fn, update_fn)


def soap(learning_rate: optax.ScalarOrSchedule, **kwargs) -> optax.GradientTransformation:
  """SOAP with a learning rate (or schedule), like optax.adam."""
  return optax.chain(scale_by_soap(**kwargs), optax.scale_by_learning_rate(learning_rate))
