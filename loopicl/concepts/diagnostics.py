"""The paper's diagnostics of a concept model's weights (Bu et al. 2024; docs/concepts.md).

Token space is D = 2·dim (word rows over label rows). Directions, as vectors of token space with
their dictionary norms (task.dictionary):

  sense   — the concept-specific ± directions, which carry the answer: [b_k; 0] (word side) and
            [0; d_k] (label side);
  shared  — their complements inside the concept: [a_k; 0] and [0; c_k], common to both senses
            (they say which concept, not which sense);
  noise   — a fixed draw of `NOISE_SAMPLES` token noise vectors ξ ~ N(0, noise_std² I_D), like the
            data's (seeded from dictionary_seed, the same at every evaluation).

`inner_products` gives the largest |inner product| of the MLP neurons w_r (rows of W_1) and of the
attention bilinear form B = Σ_h W_Q^hᵀ W_K^h (score of demonstration h_i for query z: zᵀ B h_i)
with each family; `mlp_coefficients` the full ⟨w_r, sense direction⟩ matrices (the MLP's evolution
when logged over training); `alignment` the share of the weights' energy in the concept span.
"""
from __future__ import annotations

import numpy as np

from loopicl.concepts import task as concepts

NOISE_SAMPLES = 256


def _tokens(task_config):
  """(word-side, label-side) token embeddings [D, K] of each family: sense and shared."""
  dim = int(task_config.dim)
  dic = concepts.dictionary(task_config)
  K = dic.a.shape[1]
  pad = np.zeros((dim, K))
  word = lambda v: np.concatenate([v, pad], axis=0)
  label = lambda v: np.concatenate([pad, v], axis=0)
  return {"sense": (word(dic.b), label(dic.d)), "shared": (word(dic.a), label(dic.c))}


def noise_vectors(task_config) -> np.ndarray:
  """[NOISE_SAMPLES, D]: the fixed noise draw (float64)."""
  rng = np.random.default_rng([int(task_config.dictionary_seed), 0x401CE])
  return float(task_config.noise_std) * rng.standard_normal((NOISE_SAMPLES, 2 * int(task_config.dim)))


def _weights(model):
  W1 = np.asarray(model.W_1[...], np.float64)
  B = np.einsum("hed,hef->df", np.asarray(model.W_Q[...], np.float64),
                np.asarray(model.W_K[...], np.float64))
  return W1, B


def _max_abs(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.max(np.abs(x))) if x.size and np.all(np.isfinite(x)) else float("nan")


def inner_products(model, task_config) -> dict:
  """Largest |inner products| (Python floats; nan for non-finite weights):

    ip_mlp_{sense,shared}_{word,label}  max_{r,k} |⟨w_r, u_k⟩|, u_k the family's word/label vector
    ip_mlp_noise                        max_{r,j} |⟨w_r, ξ_j⟩|
    ip_attn_{sense,shared}_word         max_k |u_kᵀ B u_k|   (query word sense → the same concept's
                                        word sense in a demonstration: "attend to the same sense")
    ip_attn_{sense,shared}_label        max_k |u_kᵀ B v_k|   (query word → demonstration label, v_k
                                        the label-side vector of the same family)
    ip_attn_noise                       max_{j≠j'} |ξ_jᵀ B ξ_j'|
    attn_sense_{word,label}_by_concept  [K] lists, signed b_kᵀ B b_k and b_kᵀ B d_k
  """
  W1, B = _weights(model)
  xi = noise_vectors(task_config)
  out = {}
  for fam, (word, label) in _tokens(task_config).items():
    out[f"ip_mlp_{fam}_word"] = _max_abs(W1 @ word)
    out[f"ip_mlp_{fam}_label"] = _max_abs(W1 @ label)
    out[f"ip_attn_{fam}_word"] = _max_abs(np.einsum("dk,de,ek->k", word, B, word))
    out[f"ip_attn_{fam}_label"] = _max_abs(np.einsum("dk,de,ek->k", word, B, label))
    if fam == "sense":  # per concept, signed: which key the query's sense direction looks for
      out["attn_sense_word_by_concept"] = np.einsum("dk,de,ek->k", word, B, word).tolist()
      out["attn_sense_label_by_concept"] = np.einsum("dk,de,ek->k", word, B, label).tolist()
  out["ip_mlp_noise"] = _max_abs(W1 @ xi.T)
  pairs = xi @ B @ xi.T
  out["ip_attn_noise"] = _max_abs(pairs[~np.eye(len(xi), dtype=bool)])
  return out


def mlp_coefficients(model, task_config) -> dict:
  """{"mlp_sense_word", "mlp_sense_label"}: [m][K] lists, ⟨w_r, [b_k; 0]⟩ and ⟨w_r, [0; d_k]⟩."""
  W1, _ = _weights(model)
  word, label = _tokens(task_config)["sense"]
  return {"mlp_sense_word": (W1 @ word).tolist(), "mlp_sense_label": (W1 @ label).tolist()}


def _projector(B: np.ndarray) -> np.ndarray:
  q, _ = np.linalg.qr(B)
  return q @ q.T


def concept_projector(task_config) -> np.ndarray:
  """[D, D]: orthogonal projector onto the span of all concept vectors (a, b word rows; c, d
  label rows); 1 − it projects onto the directions only noise lives in."""
  t = _tokens(task_config)
  return _projector(np.concatenate([*t["shared"], *t["sense"]], axis=1))


def sign_projector(task_config) -> np.ndarray:
  """[D, D]: projector onto the sense directions only (b_k word side, d_k label side)."""
  return _projector(np.concatenate(_tokens(task_config)["sense"], axis=1))


def _fraction_in(P: np.ndarray, M: np.ndarray, side: str) -> float:
  total = float(np.sum(M * M))
  if total == 0 or not np.isfinite(total):
    return float("nan")
  proj = M @ P if side == "right" else P @ M @ P
  return float(np.sum(proj * proj)) / total


def alignment(model, task_config) -> dict:
  """Share of the weights' energy in the concept span P versus noise directions:

    alignment_mlp            = ||W_1 P||_F² / ||W_1||_F²     (rows w_r are the neurons)
    alignment_mlp_sign       = ||W_1 P_s||_F² / ||W_1||_F²   (P_s: the sense directions)
    alignment_attention      = ||P B P||_F² / ||B||_F²
    alignment_attention_sign = ||P_s B P_s||_F² / ||B||_F²
    alignment_chance_mlp, alignment_chance_attention: the expected values for isotropic random
                               weights, 4K/D and (4K/D)².
  Python floats (nan if a weight is all zero or non-finite).
  """
  P, Ps = concept_projector(task_config), sign_projector(task_config)
  W1, B = _weights(model)
  r = 4 * int(task_config.num_concepts) / P.shape[0]
  return {"alignment_mlp": _fraction_in(P, W1, "right"),
          "alignment_mlp_sign": _fraction_in(Ps, W1, "right"),
          "alignment_attention": _fraction_in(P, B, "both"),
          "alignment_attention_sign": _fraction_in(Ps, B, "both"),
          "alignment_chance_mlp": r, "alignment_chance_attention": r * r}
