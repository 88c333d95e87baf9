"""Multi-concept word semantics as an in-context classification task (docs/theory.md §5, Bu et al. 2024).

The concept dictionary (drawn once from `dictionary_seed`, shared by the whole task distribution):
K concepts, concept k owning four orthogonal directions of two orthonormal bases, U (word side) and
V (label side), both [dim, 2K]:

    a_k = a_norm · U[:, 2k]      b_k = b_norm · U[:, 2k+1]       μ_k^± = a_k ± b_k   (words)
    c_k = label_a_norm · V[:, 2k] d_k = label_b_norm · V[:, 2k+1]  q_k^± = c_k ± d_k   (labels)

so μ_k^+ · μ_k^- = ||a||² − ||b||² > 0 (one concept's two senses are positively correlated) and
vectors of different concepts are orthogonal.

A prompt has a task concept k* and L = n_context demonstrations plus one query. Word i is

    x_i = μ_{k*}^{s_i} + Σ_{j ∈ S_i} μ_j^{t_ij} + ξ_i,     ξ_i ~ N(0, noise_std² I_dim)

with the task concept's sign s_i, a random set S_i of `concepts_per_word` other concepts and their
signs t_ij (every sign is + with probability `sign_balance`). Demonstration i carries the label
vector y_i = q_{k*}^{z_i} + ξ'_i (ξ'_i like ξ_i) with z_i = π · s_i; the query's answer is
z = π · s_q. Only the task concept lives on the label side.

π ∈ {±1} is the prompt's *label polarity*. It makes the labels necessary: without it the answer
s_q follows from the label-free input (k* is the concept the demonstrations share), and a network
ignores the labels. On a *flipping* concept π = −1 with probability `label_flip_prob` (0.5: the
answer is independent of the label-free input; a label-blind predictor is at chance). The last
`fixed_polarity_concepts` concepts never flip in training (π = +1 always): switched semantics on
them is out of the training distribution.

Training mixture of k*: the first `rare_concepts` concepts have weight `rare_weight`, the others
weight 1 (normalised). Network input (a column stacks word over label):

    H: [batch, 2·dim, L + 1],   H[:, :, i] = [x_i; y_i] (i < L),   H[:, :, L] = [x_q; 0]

Variants (`sample(..., variant=...)`; any of them with another L through `n_context=`):
  * "train":    the training distribution (pairs of `ood.unseen_holdout` excluded);
  * "test":     the same distribution on an evaluation key stream (key folded with a constant, so
                `sample(key, …, "test")` never repeats `sample(key, …, "train")`);
  * "skewed":   k* is a rare concept with probability `ood.skew` (uniform within the rare and
                within the common concepts) — a mixture tilted to what training rarely saw;
  * "switched": k* uniform over the fixed-polarity concepts and π = −1: the ± roles of the task
                concept swapped in the labels AND the answer, on concepts whose mapping never
                flipped in training; a model that reads the labels still answers right, one that
                memorised sign → label is wrong on every prompt;
  * "unseen":   every word's extra concepts are held-out partners of k* (pairs never seen in
                training; k* uniform over all K).
The length variants of the report are "test" prompts with L in `ood.lengths_short` and
`ood.lengths_long`.

Held-out pairs: with h = `ood.unseen_holdout`, the unordered pairs {k, (k ± r) mod K}, r = 1 … h,
never occur as (task concept, extra concept) outside "unseen"; there each word's extras are drawn
from H(k*) = {(k* ± r) mod K : r = 1 … h} only.

`sample` is a pure function of its key: call it inside `jit` (the config is read at trace time).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopicl.concepts.schema import (  # noqa: F401  (re-exported: the task's public API)
    KIND, OOD_VARIANTS, VARIANTS, _is_int, default_config, holdout_partners, validate,
    validate_variant)
# Folded into the key of every variant but "train": evaluation draws never repeat training ones.
_EVAL_STREAM = 0x5EED


def flipping(task_config) -> np.ndarray:
  """[K] bool: may π = −1 for task concept k in training (all but the last f concepts)."""
  K, f = int(task_config.num_concepts), int(task_config.fixed_polarity_concepts)
  return np.arange(K) < K - f


def concept_probs(task_config, variant: str = "train") -> np.ndarray:
  """[K] float64: P(k* = k) under `variant` (module doc)."""
  c = task_config
  K, r = int(c.num_concepts), int(c.rare_concepts)
  rare = np.arange(K) < r
  if variant == "skewed":
    return np.where(rare, c.ood.skew / r, (1.0 - c.ood.skew) / (K - r))
  if variant == "switched":
    fixed = ~flipping(c)
    return fixed / fixed.sum()
  if variant == "unseen":
    return np.full(K, 1.0 / K)
  w = np.where(rare, float(c.rare_weight), 1.0)
  return w / w.sum()


class Dictionary(NamedTuple):
  """The concept vectors, float64 numpy (columns are concepts).

  a, b: [dim, K]  word side, μ_k^± = a[:, k] ± b[:, k].
  c, d: [dim, K]  label side, q_k^± = c[:, k] ± d[:, k].
  """
  a: np.ndarray
  b: np.ndarray
  c: np.ndarray
  d: np.ndarray


def dictionary(task_config) -> Dictionary:
  """The concept dictionary of the task distribution, drawn once from `dictionary_seed`."""
  dim, K = int(task_config.dim), int(task_config.num_concepts)
  rng = np.random.default_rng(int(task_config.dictionary_seed))

  def basis():  # 2K orthonormal columns of a Haar-random rotation.
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.sign(np.diag(r)))[:, :2 * K]

  U, V = basis(), basis()
  c = task_config
  return Dictionary(a=c.a_norm * U[:, 0::2], b=c.b_norm * U[:, 1::2],
                    c=c.label_a_norm * V[:, 0::2], d=c.label_b_norm * V[:, 1::2])


class ConceptBatch(NamedTuple):
  """A batch of prompts and the diagnostics evaluation needs.

  H:              [batch, 2·dim, L + 1]  tokens [word; label]; the query (last column) has label 0.
  labels:         [batch]         the answer z = π · s_q ∈ {−1, +1} (float).
  correct:        [batch, L]      bool: demonstration i has the query's k*-sign (s_i = s_q).
  task_concept:   [batch]         k* (int32).
  polarity:       [batch]         π ∈ {−1, +1} (float): −1 flips the sign → label mapping.
  signs:          [batch, L + 1]  s_i, the words' k*-signs (the query last), ±1 float.
  demo_labels:    [batch, L]      z_i = π · s_i, the demonstrations' label signs, ±1 float.
  extra_concepts: [batch, L + 1, concepts_per_word]  S_i, each word's extra concepts (int32).
  """
  H: jax.Array
  labels: jax.Array
  correct: jax.Array
  task_concept: jax.Array
  polarity: jax.Array
  signs: jax.Array
  demo_labels: jax.Array
  extra_concepts: jax.Array


def _allowed_partners(task_config, variant: str) -> np.ndarray:
  """[K, K] bool: allowed[k*, j] — may j be an extra concept of a word with task concept k*."""
  K = int(task_config.num_concepts)
  held = np.zeros((K, K), bool)
  for k in range(K):
    held[k, list(holdout_partners(task_config, k))] = True
  if variant == "unseen":
    return held
  return ~held & ~np.eye(K, dtype=bool)


def sample(key: jax.Array, task_config, batch_size: int, variant: str = "train",
           n_context: int | None = None) -> ConceptBatch:
  """Draws `batch_size` independent prompts of `variant` with L = n_context (default: the
  config's). Pure and jit-able (see module doc); the traced sampler is cached per
  (config, batch_size, variant, L), so eager calls compile once."""
  validate(task_config)
  validate_variant(task_config, variant)
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
  L = task_config.n_context if n_context is None else n_context
  if not _is_int(L) or L < 1:
    raise ValueError(f"n_context={n_context!r} is invalid; allowed: an integer >= 1")
  return _sampler(_frozen(task_config), int(batch_size), variant, int(L),
                  jnp.result_type(float))(key)


def _canonical(v):
  if isinstance(v, dict):
    return {k: _canonical(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return tuple(_canonical(x) for x in v)
  return v


def _frozen(task_config) -> ml_collections.FrozenConfigDict:
  """The sampler's cache key (and the config it reads): lists as tuples, so a config read back
  from config.json (JSON has no tuples) finds the samplers compiled for the config it was saved
  from; without ood.lengths_*, which the sampler never reads (it is given L), so configs that
  differ only in the report's lengths share their samplers."""
  c = _canonical(task_config.to_dict())
  c["ood"] = {k: v for k, v in c["ood"].items() if not k.startswith("lengths_")}
  return ml_collections.FrozenConfigDict(c)


@functools.lru_cache(maxsize=128)
def _sampler(task_config, batch_size: int, variant: str, L: int, dtype):
  return jax.jit(functools.partial(_sample, task_config=task_config, batch_size=batch_size,
                                   variant=variant, L=L, dtype=dtype))


def _uniforms(key, shapes, dtype):
  """Independent U[0, 1) arrays of the given shapes from ONE flat threefry draw: XLA:CPU compiles
  threefry over a 1-D shape ~10x faster than over a multi-dimensional one (measured 0.25 s vs
  1.7-3.5 s), and each separate draw costs that again."""
  sizes = [math.prod(s) for s in shapes]
  flat = jax.random.uniform(key, (sum(sizes),), dtype)
  parts = jnp.split(flat, np.cumsum(sizes)[:-1])
  return [p.reshape(s) for p, s in zip(parts, shapes)]


def _sample(key, *, task_config, batch_size: int, variant: str, L: int, dtype) -> ConceptBatch:
  c = task_config
  K, dim, n_extra = int(c.num_concepts), int(c.dim), int(c.concepts_per_word)
  B, W = batch_size, L + 1  # W words per prompt: L demonstrations and the query.
  dic = dictionary(c)
  a, b, cc, d = (jnp.asarray(v, dtype) for v in dic)
  if variant != "train":
    key = jax.random.fold_in(key, _EVAL_STREAM)
  # Per prompt: (task concept, polarity); per word: (its k*-sign, the signs of the K possible
  # extra concepts, the K uniforms that choose the extras); the Gaussian noise of words and labels.
  u_prompt, u_word, u_noise = _uniforms(key, [(B, 2), (B, W, 1 + 2 * K), (B, W + L, dim)], dtype)
  # N(0, 1) by the inverse CDF, as jax.random.normal does (u = 0 nudged off the pole).
  tiny = jnp.finfo(dtype).eps
  noise = c.noise_std * np.sqrt(2.0) * jax.scipy.special.erfinv(
      jnp.clip(2.0 * u_noise - 1.0, -1.0 + tiny, 1.0 - tiny))

  # k* by the inverse CDF of the variant's mixture (a zero-probability concept is never drawn).
  p = concept_probs(c, variant)
  edges = jnp.asarray(np.cumsum(p)[:-1], dtype)
  task = jnp.sum(u_prompt[:, :1] >= edges, axis=-1)
  task = jnp.where(jnp.asarray(p > 0)[task], task, int(np.flatnonzero(p > 0)[-1]))
  task = task.astype(jnp.int32)

  def to_sign(u):  # +1 with probability sign_balance.
    return jnp.where(u < c.sign_balance, 1.0, -1.0).astype(dtype)

  signs = to_sign(u_word[..., 0])                                         # s_i, the query last.
  extra_signs = to_sign(u_word[..., 1:K + 1])                             # [B, W, K]
  # Extra concepts: the n_extra smallest of K uniforms, disallowed concepts pushed to +inf —
  # a uniformly random subset of the allowed partners of k*, jit-friendly.
  allowed = jnp.asarray(_allowed_partners(c, variant))[task]              # [B, K]
  u = jnp.where(allowed[:, None, :], u_word[..., K + 1:], jnp.inf)
  extra = jax.lax.top_k(-u, n_extra)[1].astype(jnp.int32)                 # [B, W, n_extra]
  presence = jnp.sum(jax.nn.one_hot(extra, K, dtype=dtype), axis=-2)      # [B, W, K] 0/1
  task_onehot = jax.nn.one_hot(task, K, dtype=dtype)[:, None, :]          # [B, 1, K]
  # Coefficients of a_k and b_k in each word: x = Σ_k A_k a_k + S_k b_k + ξ.
  coef_a = task_onehot + presence
  coef_b = task_onehot * signs[..., None] + presence * extra_signs
  words = coef_a @ a.T + coef_b @ b.T + noise[:, :W]                      # [B, W, dim]

  if variant == "switched":
    polarity = -jnp.ones((B,), dtype)
  else:
    may_flip = jnp.asarray(flipping(c))[task]
    polarity = jnp.where(may_flip & (u_prompt[:, 1] < c.label_flip_prob), -1.0, 1.0).astype(dtype)
  demo_labels = polarity[:, None] * signs[:, :L]                          # z_i = π s_i
  label_vecs = (task_onehot @ cc.T) + demo_labels[..., None] * (task_onehot @ d.T)  # q_{k*}^{z_i}
  label_vecs = label_vecs + noise[:, W:]
  label_vecs = jnp.concatenate([label_vecs, jnp.zeros((B, 1, dim), dtype)], axis=1)  # query: 0

  H = jnp.swapaxes(jnp.concatenate([words, label_vecs], axis=-1), -1, -2)  # [B, 2·dim, L + 1]
  return ConceptBatch(
      H=H, labels=polarity * signs[:, L], correct=signs[:, :L] == signs[:, L:],
      task_concept=task, polarity=polarity, signs=signs, demo_labels=demo_labels,
      extra_concepts=extra)


def zero_labels(H: jax.Array, task_config) -> jax.Array:
  """H with every label part set to 0: the input of the label-blind control."""
  return H.at[..., int(task_config.dim):, :].set(0.0)
