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

π ∈ {±1} is the prompt's *label polarity*, −1 with probability `label_flip_prob`. It is what makes
the labels necessary: without it the answer is s_q, a function of the query word and of k* (which
the demonstrations reveal without their labels: it is the concept they all share), and a network
trained on it ignores the labels' signs, then fails completely on switched semantics (a prototype
was 90% wrong). With π, a flipped prompt has the same label-free input distribution as an
unflipped one and the negated answer, so a label-blind predictor's errors on the two polarities
add up to one: it cannot beat chance on both. The default 0.5 makes the answer independent of
the label-free input (every prompt needs its labels; a blind model is at chance everywhere) and
trains fastest and most reliably: 0.1 (the smallest flip that still forces reading the labels)
leaves a long plateau on the sign → label shortcut, where some seeds sit at 10–40% error on
switched prompts after 5000 steps (measured with `concept_model.ConceptTransformer`).

Network input (the token of a column stacks word over label):

    H: [batch, 2·dim, L + 1],   H[:, :, i] = [x_i; y_i] (i < L),   H[:, :, L] = [x_q; 0]

Variants (`sample(..., variant=...)`):
  * "train":    the training distribution (k* uniform, pairs of `ood.unseen_holdout` excluded);
  * "test":     the same distribution on an evaluation key stream (key folded with a constant, so
                `sample(key, …, "test")` never repeats `sample(key, …, "train")`);
  * "length":   L = `ood.length` demonstrations instead of n_context;
  * "skewed":   k* = 0 with probability `ood.skew`, the others uniform over the rest;
  * "switched": switched semantics, π = −1 in every prompt: the ± roles of the task concept are
                swapped in the demonstrations' labels AND the answer. It uses the same draws as
                "test" for the same key, so its words are identical and only the label signs and
                answers are inverted; a model that reads the labels still answers right, one that
                memorised sign → label is wrong on every prompt;
  * "unseen":   every word's extra concepts are held-out partners of k* (pairs never seen in
                training; k* uniform over all K).

Held-out pairs: with h = `ood.unseen_holdout`, the unordered pairs {k, (k ± r) mod K}, r = 1 … h,
never occur as (task concept, extra concept) outside "unseen"; there each word's extras are drawn
from H(k*) = {(k* ± r) mod K : r = 1 … h} only. (Two extra concepts of one word are not
constrained: the pairs are about the task concept.)

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

KIND = "concept_classification"
VARIANTS = ("train", "test", "length", "skewed", "switched", "unseen")
OOD_VARIANTS = ("length", "skewed", "switched", "unseen")
# Folded into the key of every variant but "train": evaluation draws never repeat training ones,
# and "test" and "switched" from one key share their words (a paired comparison).
_EVAL_STREAM = 0x5EED


def default_config() -> ml_collections.ConfigDict:
  """The `task` section for kind = "concept_classification", with every knob."""
  c = ml_collections.ConfigDict()
  c.kind = KIND                 # the task kind (this module).
  c.num_concepts = 6            # K: concepts in the dictionary.
  c.dim = 32                    # word (and label) embedding dimension; needs dim >= 2K.
  c.concepts_per_word = 1       # |S|: random extra concepts per word besides k*.
  c.a_norm = 1.0                # ||a_k||: the concept's shared direction (word side).
  c.b_norm = 0.5                # ||b_k|| < ||a_k||: the sense (±) direction (word side).
  c.label_a_norm = 1.0          # ||c_k||: shared direction of the label vectors q_k^± = c_k ± d_k.
  c.label_b_norm = 1.0          # ||d_k|| > 0: the label's sign direction.
  c.noise_std = 0.05            # ξ: per-coordinate std of the Gaussian noise on words and labels.
  c.n_context = 16              # L: demonstrations per prompt.
  c.sign_balance = 0.5          # P(sign = +1) for every concept sign (task and extra).
  c.label_flip_prob = 0.5       # P(π = −1): per-prompt label polarity flip; makes labels necessary
                                # (0.5: the answer is independent of the label-free input).
  c.dictionary_seed = 0         # seed of the one concept dictionary shared by all prompts.
  c.ood = ml_collections.ConfigDict()
  c.ood.length = 32             # L of the "length" variant (e.g. 2L or L/2).
  c.ood.skew = 0.5              # "skewed": P(k* = 0); the other K − 1 concepts share the rest.
  c.ood.unseen_holdout = 1      # h: pairs {k, k ± r mod K}, r = 1..h, seen only in "unseen".
  return c


def _fail(field: str, value, allowed: str):
  raise ValueError(f"task.{field}={value!r} is invalid; allowed: {allowed}")


def _is_int(v) -> bool:
  return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


def _is_num(v) -> bool:
  return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer,
                                                                np.floating))


def holdout_partners(task_config, k: int) -> tuple[int, ...]:
  """H(k): the concepts whose pair with task concept k is held out for "unseen" (sorted)."""
  K, h = int(task_config.num_concepts), int(task_config.ood.unseen_holdout)
  return tuple(sorted({(k + s * r) % K for r in range(1, h + 1) for s in (1, -1)} - {k}))


def validate(task_config) -> None:
  """Raises ValueError naming the field and the allowed values for a bad task config."""
  c = task_config
  if c.kind != KIND:
    _fail("kind", c.kind, KIND)
  for field, low in (("num_concepts", 2), ("dim", 1), ("n_context", 1), ("dictionary_seed", 0),
                     ("concepts_per_word", 0)):
    if not _is_int(c[field]) or c[field] < low:
      _fail(field, c[field], f"an integer >= {low}")
  K = int(c.num_concepts)
  if c.dim < 2 * K:
    _fail("dim", c.dim, f"an integer >= 2 * num_concepts = {2 * K} (a_k, b_k orthonormal)")
  for field in ("a_norm", "b_norm", "label_a_norm", "label_b_norm", "noise_std"):
    if not _is_num(c[field]) or not np.isfinite(c[field]) or c[field] < 0:
      _fail(field, c[field], "a finite number >= 0")
  if c.b_norm <= 0:
    _fail("b_norm", c.b_norm, "a finite number > 0 (the ± senses must differ)")
  if c.a_norm <= c.b_norm:
    _fail("a_norm", c.a_norm, f"a finite number > b_norm = {c.b_norm} (μ_k^+ · μ_k^- > 0)")
  if c.label_b_norm <= 0:
    _fail("label_b_norm", c.label_b_norm, "a finite number > 0 (labels must carry their sign)")
  if not _is_num(c.sign_balance) or not 0 < c.sign_balance < 1:
    _fail("sign_balance", c.sign_balance, "a number in (0, 1)")
  if not _is_num(c.label_flip_prob) or not 0 <= c.label_flip_prob <= 1:
    _fail("label_flip_prob", c.label_flip_prob, "a number in [0, 1]")
  if not _is_int(c.ood.length) or c.ood.length < 1:
    _fail("ood.length", c.ood.length, "an integer >= 1")
  if not _is_num(c.ood.skew) or not 1.0 / K <= c.ood.skew < 1:
    _fail("ood.skew", c.ood.skew, f"a number in [1/num_concepts, 1) = [{1.0 / K:.4g}, 1)")
  h = c.ood.unseen_holdout
  if not _is_int(h) or h < 0:
    _fail("ood.unseen_holdout", h, "an integer >= 0")
  if c.concepts_per_word > K - 1:
    _fail("concepts_per_word", c.concepts_per_word,
          f"an integer in [0, num_concepts − 1 = {K - 1}]")
  held = len(holdout_partners(c, 0))
  if K - 1 - held < c.concepts_per_word:
    _fail("ood.unseen_holdout", h, f"an integer h >= 0 with concepts_per_word <= num_concepts − 1 "
          f"− min(2h, num_concepts − 1) (training needs enough partners; now {K - 1 - held})")


def validate_variant(task_config, variant: str) -> None:
  """Raises ValueError if `variant` is unknown or undefined for this config ("unseen" needs
  held-out partners for every word's extra concepts)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is invalid; allowed: {' | '.join(VARIANTS)}")
  if variant == "unseen":
    held = len(holdout_partners(task_config, 0))
    if held < task_config.concepts_per_word or task_config.concepts_per_word < 1:
      _fail("ood.unseen_holdout", task_config.ood.unseen_holdout,
            f"for variant='unseen', an integer h >= 1 with min(2h, K − 1) >= concepts_per_word "
            f"= {task_config.concepts_per_word} >= 1")


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


def concept_projector(task_config) -> np.ndarray:
  """[2·dim, 2·dim]: orthogonal projector of token space onto the span of all concept vectors
  (a_k, b_k in the word rows, c_k, d_k in the label rows); 1 − it projects onto noise directions."""
  dim = int(task_config.dim)
  dic = dictionary(task_config)
  B = np.zeros((2 * dim, 4 * int(task_config.num_concepts)))
  B[:dim, :2 * dic.a.shape[1]] = np.concatenate([dic.a, dic.b], axis=1)
  B[dim:, 2 * dic.a.shape[1]:] = np.concatenate([dic.c, dic.d], axis=1)
  q, _ = np.linalg.qr(B)
  return q @ q.T


def sign_projector(task_config) -> np.ndarray:
  """[2·dim, 2·dim]: projector onto the sense directions only (b_k word side, d_k label side),
  the directions that carry the answer."""
  dim = int(task_config.dim)
  dic = dictionary(task_config)
  B = np.zeros((2 * dim, 2 * int(task_config.num_concepts)))
  K = dic.b.shape[1]
  B[:dim, :K], B[dim:, K:] = dic.b, dic.d
  q, _ = np.linalg.qr(B)
  return q @ q.T


def context_length(task_config, variant: str = "train") -> int:
  """L, the number of demonstrations of a prompt of `variant`."""
  return int(task_config.ood.length if variant == "length" else task_config.n_context)


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


def sample(key: jax.Array, task_config, batch_size: int, variant: str = "train") -> ConceptBatch:
  """Draws `batch_size` independent prompts of `variant`. Pure and jit-able (see module doc).

  The traced sampler is cached per (config, batch_size, variant), so eager calls compile once.
  """
  validate(task_config)
  validate_variant(task_config, variant)
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
  frozen = ml_collections.FrozenConfigDict(task_config)
  return _sampler(frozen, int(batch_size), variant, jnp.result_type(float))(key)


@functools.lru_cache(maxsize=128)
def _sampler(task_config, batch_size: int, variant: str, dtype):
  return jax.jit(functools.partial(_sample, task_config=task_config, batch_size=batch_size,
                                   variant=variant, dtype=dtype))


def _uniforms(key, shapes, dtype):
  """Independent U[0, 1) arrays of the given shapes from ONE flat threefry draw: XLA:CPU compiles
  threefry over a 1-D shape ~10x faster than over a multi-dimensional one (measured 0.25 s vs
  1.7-3.5 s), and each separate draw costs that again."""
  sizes = [math.prod(s) for s in shapes]
  flat = jax.random.uniform(key, (sum(sizes),), dtype)
  parts = jnp.split(flat, np.cumsum(sizes)[:-1])
  return [p.reshape(s) for p, s in zip(parts, shapes)]


def _sample(key, *, task_config, batch_size: int, variant: str, dtype) -> ConceptBatch:
  c = task_config
  K, dim, n_extra = int(c.num_concepts), int(c.dim), int(c.concepts_per_word)
  L = context_length(c, variant)
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

  if variant == "skewed":
    p = np.full(K, (1.0 - c.ood.skew) / (K - 1))
    p[0] = c.ood.skew
    edges = jnp.asarray(np.cumsum(p)[:-1], dtype)                          # inverse CDF
    task = jnp.sum(u_prompt[:, :1] >= edges, axis=-1)
  else:
    task = jnp.minimum(jnp.floor(u_prompt[:, 0] * K), K - 1)
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
    polarity = jnp.where(u_prompt[:, 1] < c.label_flip_prob, -1.0, 1.0).astype(dtype)
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
