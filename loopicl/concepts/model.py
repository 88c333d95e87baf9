"""The softmax-attention + ReLU-MLP classifier of the multi-concept task (docs/theory.md §5), its
logistic loss and its evaluation metrics.

The network reads a prompt H: [batch, D, L + 1] (D = 2·dim: word over label; the last column is
the query, see `concepts.py`) and outputs one scalar f(H); the prediction is sign(f).

    z_0 = h_q                                                   (the query token, [D])
    α^h_t = softmax_i( (W_Q^h z_{t−1}) · (W_K^h h_i) ),  i = 1 … L     (demonstrations only)
    z_t = z_{t−1} + (1/heads) Σ_h Σ_i α^h_{t,i} h_i                 t = 1 … loops
    f(H) = Σ_r a_r ReLU(w_r · z_T),   a_r = +1/m (r < m/2), −1/m (r ≥ m/2)   fixed

The mask: the softmax runs over the L demonstration columns only, so the query never attends to
itself (its key is never formed; its own content reaches f only through the residual z_0 = h_q
and through the attention *query* W_Q z). Values are the tokens themselves (no value matrix): the
attention output is a convex combination of demonstrations, which is what "correct attention"
measures. With loops > 1 the same (W_Q, W_K, w_r) are reused: the query's representation is
updated residually and re-attends each loop (e.g. a first loop could pick up k*, which all
demonstrations share, and the next attend by the k*-sign). Nothing has a bias.

Training (configs/concepts.py; results in docs/concepts.md): `default_model_config()`,
`logistic_loss`, plain SGD with learning rate 10 (constant, no momentum, no clipping), 3000 steps
of 128 fresh prompts.

The output layer a is a `FixedOutput` variable, not an `nnx.Param`: an optimizer built with
`wrt=nnx.Param` and `nnx.grad` (which differentiates Params) leave it alone.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from loopicl.concepts import task as concepts


def default_model_config() -> ml_collections.ConfigDict:
  """The `model` section for the concept task: the arguments of `ConceptTransformer`."""
  c = ml_collections.ConfigDict()
  c.mlp_width = 32     # m: ReLU neurons; the fixed output layer is ±1/m (half each).
  c.heads = 1          # softmax attention heads (their outputs are averaged).
  c.loops = 1          # applications of the shared attention (1: the paper's one layer).
  c.init_scale = 3.0   # W_Q, W_K, W_1 entries ~ N(0, init_scale² / D).
  return c


class FixedOutput(nnx.Variable):
  """A non-trainable weight (the ±1/m output layer): a Variable that is not a Param."""


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")


class ConceptTransformer(nnx.Module):
  """One softmax attention layer (query → demonstrations, optionally looped) and a ReLU MLP.

  Parameters: W_Q, W_K: [heads, D, D] ~ N(0, init_scale² / D) entrywise; W_1: [m, D] (rows w_r)
  ~ N(0, init_scale² / D). Fixed: a: [m] = (+1/m, …, −1/m, …). m = mlp_width must be even.
  """

  def __init__(self, dim_in: int, *, mlp_width: int, heads: int = 1, loops: int = 1,
               init_scale: float = 3.0, dtype=None, rngs: nnx.Rngs):
    _check_positive_int("dim_in", dim_in)
    _check_positive_int("mlp_width", mlp_width)
    _check_positive_int("heads", heads)
    _check_positive_int("loops", loops)
    if mlp_width % 2:
      raise ValueError(f"mlp_width={mlp_width!r} is invalid; allowed: an even integer >= 2 "
                       "(half the output weights are +1/m, half −1/m)")
    if not np.isfinite(init_scale) or init_scale <= 0:
      raise ValueError(f"init_scale={init_scale!r} is invalid; allowed: a finite number > 0")
    self.dim_in, self.mlp_width, self.heads, self.loops = dim_in, mlp_width, heads, loops
    dtype = dtype or jnp.result_type(float)
    std = init_scale / math.sqrt(dim_in)
    self.W_Q = nnx.Param(std * jax.random.normal(rngs.params(), (heads, dim_in, dim_in), dtype))
    self.W_K = nnx.Param(std * jax.random.normal(rngs.params(), (heads, dim_in, dim_in), dtype))
    self.W_1 = nnx.Param(std * jax.random.normal(rngs.params(), (mlp_width, dim_in), dtype))
    half = mlp_width // 2
    self.a = FixedOutput(jnp.concatenate([jnp.full((half,), 1.0 / mlp_width, dtype),
                                          jnp.full((half,), -1.0 / mlp_width, dtype)]))

  def _split(self, H: jax.Array):
    if H.ndim != 3 or H.shape[1] != self.dim_in or H.shape[2] < 2:
      raise ValueError(f"H.shape={H.shape} is invalid; allowed: [batch, {self.dim_in}, L + 1] "
                       "with L >= 1")
    tokens = jnp.swapaxes(H, -1, -2)           # [batch, L + 1, D]
    return tokens[:, :-1], tokens[:, -1]        # demonstrations [batch, L, D], query [batch, D]

  def states(self, H: jax.Array):
    """(z_T: [batch, D], attention of every loop: [loops, batch, heads, L])."""
    demos, z = self._split(H)
    keys = jnp.einsum("hed,bld->bhle", self.W_K[...], demos)  # [batch, heads, L, D]
    attns = []
    for _ in range(self.loops):  # loops is small and static: unrolled.
      q = jnp.einsum("hed,bd->bhe", self.W_Q[...], z)
      attn = jax.nn.softmax(jnp.einsum("bhe,bhle->bhl", q, keys), axis=-1)
      z = z + jnp.einsum("bhl,bld->bd", attn, demos) / self.heads
      attns.append(attn)
    return z, jnp.stack(attns)

  def __call__(self, H: jax.Array) -> jax.Array:
    """H: [batch, D, L + 1] -> logits f(H): [batch]."""
    return self.readout(self.states(H)[0])

  def readout(self, z: jax.Array) -> jax.Array:
    """The MLP: z [batch, D] -> f = Σ_r a_r ReLU(w_r · z): [batch]."""
    return jax.nn.relu(z @ self.W_1[...].T) @ self.a[...]

  def attention(self, H: jax.Array, loop: int = -1) -> jax.Array:
    """Attention weights of the query over the demonstrations at `loop`: [batch, heads, L]."""
    return self.states(H)[1][loop]


def logistic_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """mean log(1 + exp(−z f)), stable for any |z f|: logits, labels [batch] -> scalar."""
  return jnp.mean(jax.nn.softplus(-labels * logits))


def zero_one(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of prompts with sign(f) ≠ z; f = 0 and non-finite f count as wrong."""
  return jnp.mean(~(labels * logits > 0))


def correct_attention(attn: jax.Array, correct: jax.Array) -> jax.Array:
  """Mean attention mass on demonstrations sharing the query's k*-sign.

  attn: [batch, heads, L] (or [batch, L]); correct: [batch, L] bool -> scalar in [0, 1]
  (averaged over prompts and heads). Uniform attention gives the fraction of such demonstrations,
  ≈ 1/2 for sign_balance = 1/2. This is the paper's mechanism (attend to the demonstrations of the
  query's sense, copy their label); with a random polarity (label_flip_prob = 0.5) trained models
  also solve the task by concentrating on one or a few demonstrations of either sense and
  combining their (word sign, label sign) with the query's sign, and this stays near 1/2 — see
  `attention_peak` in `evaluate`.
  """
  if attn.ndim == 3:
    correct = correct[:, None, :]
  return jnp.mean(jnp.sum(attn * correct, axis=-1))


def _scores(logits, labels) -> dict:
  """zero_one (non-finite logits count as wrong), cross_entropy over the finite logits only,
  and the number of non-finite logits."""
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  finite = np.isfinite(logits)
  ce = np.logaddexp(0.0, -labels[finite] * logits[finite])
  return {"zero_one": float(np.mean(~(labels * np.where(finite, logits, 0.0) > 0))),
          "cross_entropy": float(np.mean(ce)) if ce.size else float("inf"),
          "nonfinite": int(np.sum(~finite))}


@nnx.jit
def _states(model, H):
  return model.states(H)


@nnx.jit
def _readout(model, z):
  return model.readout(z)


def evaluate(model: ConceptTransformer, task_config, key: jax.Array, num_prompts: int,
             *, label_blind: bool = False) -> dict:
  """Scores `model` on `num_prompts` held-out prompts of every variant and length.

  The prompts come from the evaluation key stream (`concepts.sample` with variant != "train"
  folds a constant into the key) of `fold_in(key, i)`, so they never coincide with training
  draws from the same key. `label_blind` zeroes the label parts first (the control model).

  Returns {"test_zero_one", "test_cross_entropy", "test_nonfinite",
           "test_zero_one_flipped", "test_zero_one_unflipped" (test prompts with polarity −1 /
           +1; nan if none), "test_zero_one_by_concept" ([K], nan where k* never drawn),
           "correct_attention" (see `correct_attention`; also "correct_attention_by_concept" [K],
           and in the skewed/switched/unseen entries), "correct_attention_uniform" (its value
           for uniform attention: the mean share of same-sense demonstrations), "attention_peak"
           (mean largest attention weight; 1/L for uniform), all on the test prompts, last loop,
           alignment_*, ip_* and mlp_sense_* (diagnostics.py),
           "length_curve": {"n_context", "zero_one", "cross_entropy"} over n_context and every
           ood.lengths_* (ascending), and "share_no_opposite" / "zero_one_no_opposite" (the
           prompts whose demonstrations all have the query's sense: their share and 0-1 loss;
           nan if none), "share_no_same" / "zero_one_no_same" (none has it),
           "ood": {name: {"zero_one", "cross_entropy", "nonfinite"}} for length_short and
           length_long (all their lengths pooled, equal prompts each, plus "worst_zero_one", the
           largest over the lengths), skewed, switched, unseen (a variant the config leaves
           undefined, e.g. no held-out pairs or an empty length tuple, is skipped)}.
  """
  from loopicl.concepts import diagnostics
  if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
    raise ValueError(f"num_prompts={num_prompts!r} is invalid; allowed: an integer >= 1")

  def run(variant, i, L=None):
    batch = concepts.sample(jax.random.fold_in(key, i), task_config, num_prompts, variant, L)
    H = concepts.zero_labels(batch.H, task_config) if label_blind else batch.H
    z, attns = _states(model, H)
    return batch, _readout(model, z), attns[-1]

  batch, logits, attn = run("test", 0)
  s = _scores(logits, batch.labels)
  flipped = np.asarray(batch.polarity) < 0
  wrong = ~(np.asarray(batch.labels * logits) > 0)
  k = np.asarray(batch.task_concept)
  out = {"test_zero_one": s["zero_one"], "test_cross_entropy": s["cross_entropy"],
         "test_nonfinite": s["nonfinite"],
         "test_zero_one_flipped": float(np.mean(wrong[flipped])) if flipped.any() else float("nan"),
         "test_zero_one_unflipped": (float(np.mean(wrong[~flipped])) if (~flipped).any()
                                     else float("nan")),
         "test_zero_one_by_concept": [float(np.mean(wrong[k == j])) if np.any(k == j)
                                      else float("nan") for j in range(int(task_config.num_concepts))],
         "correct_attention": float(correct_attention(attn, batch.correct)),
         "correct_attention_by_concept": [
             float(correct_attention(attn[k == j], batch.correct[k == j])) if np.any(k == j)
             else float("nan") for j in range(int(task_config.num_concepts))],
         "correct_attention_uniform": float(jnp.mean(batch.correct)),
         "attention_peak": float(jnp.mean(jnp.max(attn, axis=-1)))}
  out.update(diagnostics.alignment(model, task_config))
  out.update(diagnostics.inner_products(model, task_config))
  out.update(diagnostics.mlp_coefficients(model, task_config))
  L0 = int(task_config.n_context)
  by_length = {L0: (np.asarray(logits), np.asarray(batch.labels))}
  senses = {L0: np.asarray(batch.correct)}
  out["ood"] = {}
  i = 1
  for name, lengths in (("length_short", task_config.ood.lengths_short),
                        ("length_long", task_config.ood.lengths_long)):
    for L in lengths:
      b, f, _ = run("test", i, int(L))
      by_length[int(L)] = (np.asarray(f), np.asarray(b.labels))
      senses[int(L)] = np.asarray(b.correct)
      i += 1
    if len(lengths):
      pooled = [np.concatenate(x) for x in zip(*(by_length[int(L)] for L in lengths))]
      out["ood"][name] = dict(_scores(*pooled), worst_zero_one=max(
          _scores(*by_length[int(L)])["zero_one"] for L in lengths))
  curve = sorted(by_length)
  per = [_scores(*by_length[L]) for L in curve]
  out["length_curve"] = {"n_context": curve, "zero_one": [p["zero_one"] for p in per],
                         "cross_entropy": [p["cross_entropy"] for p in per]}
  # The mechanism behind short prompts: 0-1 loss on the prompts where every demonstration has
  # the query's sense (no opposite-sense one) / none has it, and how many prompts those are.
  for name, none_of in (("no_opposite", lambda c: c.all(-1)), ("no_same", lambda c: ~c.any(-1))):
    share, err = [], []
    for L in curve:
      sel = none_of(senses[L])
      wrong = ~(by_length[L][1] * np.nan_to_num(by_length[L][0]) > 0)
      share.append(float(np.mean(sel)))
      err.append(float(np.mean(wrong[sel])) if sel.any() else float("nan"))
    out["length_curve"][f"share_{name}"], out["length_curve"][f"zero_one_{name}"] = share, err
  for variant in ("skewed", "switched", "unseen"):
    try:
      concepts.validate_variant(task_config, variant)
    except ValueError:
      continue  # e.g. "unseen" with no held-out pairs: nothing to measure.
    b, f, att = run(variant, i)
    i += 1
    out["ood"][variant] = dict(_scores(f, b.labels),
                               correct_attention=float(correct_attention(att, b.correct)))
  return out
