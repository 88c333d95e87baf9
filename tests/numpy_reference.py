"""Independent float64 numpy implementations of docs/theory.md §1–3, written without loopicl."""
import numpy as np


def looped_transformer_textbook(P, Q, Z0, loops, n_queries, d_out):
  """Z_{t+1} = Z_t + (1/n) P Z_t M Z_tᵀ Q Z_t with the explicit (n+m)×(n+m) mask matrix M.

  Z0: [batch, D, n+m]. Returns read-outs [loops, batch, d_out, m] and all Z_t [loops+1, ...].
  """
  Z = np.array(Z0, dtype=np.float64)
  n = Z.shape[-1] - n_queries
  d = Z.shape[-2] - d_out
  M = np.diag(np.concatenate([np.ones(n), np.zeros(n_queries)]))
  outs, Zs = [], [Z.copy()]
  for _ in range(loops):
    Z = Z + np.einsum("ij,bjk,kl,bml,mn,bnp->bip", P, Z, M, Z, Q, Z, optimize=True) / n
    outs.append(-Z[:, d:, n:])
    Zs.append(Z.copy())
  return np.stack(outs), np.stack(Zs)


def preconditioned_gd(X, Y, A, steps):
  """W_{t+1} = W_t − (1/n)(W_t X − Y) Xᵀ A from W_0 = 0, per prompt: [steps+1, batch, d_out, d]."""
  X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
  n = X.shape[-1]
  W = np.zeros((X.shape[0], Y.shape[1], X.shape[1]))
  out = [W.copy()]
  for _ in range(steps):
    grad = np.einsum("bon,bdn->bod", np.einsum("bod,bdn->bon", W, X) - Y, X) / n
    W = W - grad @ A
    out.append(W.copy())
  return np.stack(out)
