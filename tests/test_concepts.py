"""The multi-concept task (concepts.py) and its classifier (concept_model.py): sampler invariants,
OOD variants, model mask and shapes, loss, metrics, a short training run, the label-blind control."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from loopicl import config as config_lib, registry
from loopicl.concepts import diagnostics
from loopicl.concepts import model as cm
from loopicl.concepts import task as concepts

_CONCEPTS_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "concepts.py")


def _task(**kw):
  c = concepts.default_config()
  for k, v in kw.items():
    if k.startswith("ood_"):
      c.ood[k[4:]] = v
    else:
      c[k] = v
  return c


# One small config for most checks: every (config, batch size, variant) compiles its sampler once
# (about a second on a CPU), so the tests share this one and batch size _B.
_RICH = dict(noise_std=0.0, concepts_per_word=2, num_concepts=7, dim=16, label_flip_prob=0.3,
             n_context=6, ood_lengths_short=(3,), ood_lengths_long=(9,), ood_unseen_holdout=2)
_B = 64


def _rich(**kw):
  return _task(**{**_RICH, **kw})


def _coords(batch, c):
  """Coordinates of every word / label on the concept vectors (exact when noise_std = 0).

  Returns word_a, word_b: [B, L + 1, K]; label_c, label_d: [B, L + 1, K]."""
  dic = concepts.dictionary(c)
  dim = c.dim
  H = np.asarray(batch.H, np.float64)
  words, labels = np.swapaxes(H[:, :dim], 1, 2), np.swapaxes(H[:, dim:], 1, 2)
  proj = lambda X, V: X @ V / np.sum(V * V, axis=0)
  return proj(words, dic.a), proj(words, dic.b), proj(labels, dic.c), proj(labels, dic.d)


# ----------------------------------------------------------------------------- config + dictionary


def test_default_config_is_valid_and_has_every_symbol():
  c = concepts.default_config()
  concepts.validate(c)
  for field in ("num_concepts", "dim", "concepts_per_word", "a_norm", "b_norm", "label_a_norm",
                "label_b_norm", "noise_std", "n_context", "sign_balance", "label_flip_prob",
                "fixed_polarity_concepts", "rare_concepts", "rare_weight", "dictionary_seed"):
    assert field in c
  for field in ("lengths_short", "lengths_long", "skew", "unseen_holdout"):
    assert field in c.ood
  assert c.a_norm > c.b_norm


@pytest.mark.parametrize("field,value", [
    ("kind", "linear_regression"), ("num_concepts", 1), ("dim", 11), ("dictionary_seed", -1),
    ("concepts_per_word", -1), ("a_norm", 0.5), ("b_norm", 0.0), ("label_b_norm", 0.0),
    ("noise_std", -0.1), ("noise_std", float("nan")), ("n_context", 0), ("sign_balance", 1.0),
    ("label_flip_prob", 1.5), ("ood_lengths_short", (0, 2)), ("ood_lengths_long", (32, True)),
    ("ood_skew", -0.1), ("ood_skew", 1.5), ("fixed_polarity_concepts", 6),
    ("fixed_polarity_concepts", -1), ("rare_concepts", 6), ("rare_weight", 0.0),
    ("rare_weight", 1.5), ("ood_unseen_holdout", -1), ("ood_unseen_holdout", 3),
    ("concepts_per_word", 6),
])
def test_validate_names_field_and_allowed_values(field, value):
  c = _task(**{field: value})
  name = field.replace("ood_", "ood.")
  with pytest.raises(ValueError, match=rf"task\.{name}=.* is invalid; allowed: "):
    concepts.validate(c)


def test_unknown_field_under_task_ood_is_one_line_naming_the_allowed_keys():
  # ood is a sub-section: a stale or misspelt key there (the old ood.length) is refused by the
  # config check, not silently ignored.
  c = config_lib.load_file(_CONCEPTS_CONFIG)
  config_lib.validate(c)
  c.task.ood.length = 8
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert "\n" not in message and message.startswith("config.task.ood.length is an unknown field")
  for key in registry.get(c.task.kind).task_config().ood.keys():
    assert key in message
  c = config_lib.load_file(_CONCEPTS_CONFIG)
  c.task = ml_collections.ConfigDict({**c.task.to_dict(), "ood": 8})   # a config built from scratch
  with pytest.raises(config_lib.ConfigError, match=r"config\.task\.ood=8 is invalid; allowed: a section"):
    config_lib.validate(c)


def test_bad_variant_and_unusable_unseen_raise():
  c = concepts.default_config()
  with pytest.raises(ValueError, match="variant='ood' is invalid; allowed: train"):
    concepts.sample(jax.random.key(0), c, 2, "ood")
  with pytest.raises(ValueError, match=r"task\.ood\.unseen_holdout=0 is invalid"):
    concepts.sample(jax.random.key(0), _task(ood_unseen_holdout=0), 2, "unseen")
  with pytest.raises(ValueError, match="batch_size=0 is invalid"):
    concepts.sample(jax.random.key(0), c, 0)
  with pytest.raises(ValueError, match="n_context=0 is invalid"):
    concepts.sample(jax.random.key(0), c, 2, "test", 0)
  with pytest.raises(ValueError, match=r"task\.fixed_polarity_concepts=0 is invalid"):
    concepts.sample(jax.random.key(0), _task(fixed_polarity_concepts=0), 2, "switched")
  with pytest.raises(ValueError, match=r"task\.rare_concepts=0 is invalid"):
    concepts.sample(jax.random.key(0), _task(rare_concepts=0), 2, "skewed")


def test_dictionary_orthogonal_across_concepts_and_correlated_within():
  c = _task(num_concepts=5, dim=12, a_norm=1.5, b_norm=0.7, label_a_norm=0.8, label_b_norm=1.2)
  dic = concepts.dictionary(c)
  K = c.num_concepts
  for side, (u, v, nu, nv) in {"word": (dic.a, dic.b, 1.5, 0.7),
                               "label": (dic.c, dic.d, 0.8, 1.2)}.items():
    G = np.concatenate([u, v], axis=1)
    gram = G.T @ G
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-12, err_msg=side)  # all ⟂
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), nu, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(v, axis=0), nv, rtol=1e-12)
  mu_p, mu_m = dic.a + dic.b, dic.a - dic.b
  within = np.sum(mu_p * mu_m, axis=0)
  np.testing.assert_allclose(within, 1.5**2 - 0.7**2, rtol=1e-12)
  assert np.all(within > 0)
  across = np.concatenate([mu_p, mu_m], 1).T @ np.concatenate([mu_p, mu_m], 1)
  for k in range(K):
    for l in range(K):
      if k != l:
        assert abs(across[k, l]) < 1e-12 and abs(across[k, K + l]) < 1e-12
  # One dictionary per seed: the same vectors every call, new ones for another seed.
  np.testing.assert_array_equal(concepts.dictionary(c).a, dic.a)
  c.dictionary_seed = 1
  assert not np.allclose(concepts.dictionary(c).a, dic.a)


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("variant", concepts.VARIANTS)
def test_words_and_labels_follow_the_dictionary(variant):
  c = _rich()
  b = concepts.sample(jax.random.key(1), c, _B, variant)
  L = c.n_context
  assert b.H.shape == (_B, 2 * c.dim, L + 1)
  wa, wb, lc, ld = _coords(b, c)
  k = np.asarray(b.task_concept)
  rows = np.arange(_B)
  s = np.asarray(b.signs)
  extra = np.asarray(b.extra_concepts)
  # Every word holds k* with its sign, and exactly its extra concepts with ±1 signs.
  np.testing.assert_allclose(wa[rows, :, k], 1.0, atol=1e-5)
  np.testing.assert_allclose(wb[rows, :, k], s, atol=1e-5)
  presence = np.zeros_like(wa)
  np.put_along_axis(presence, extra, 1.0, axis=-1)
  presence[rows, :, k] = 1.0
  np.testing.assert_allclose(wa, presence, atol=1e-5)
  np.testing.assert_allclose(np.abs(wb), presence, atol=1e-5)
  assert np.all(extra != k[:, None, None])
  assert np.all(np.sort(extra, -1)[..., 1:] != np.sort(extra, -1)[..., :-1])  # distinct extras
  # Labels: q_{k*}^{z_i} with z_i = π s_i on demonstrations, nothing on the query.
  pol = np.asarray(b.polarity)
  np.testing.assert_array_equal(np.asarray(b.demo_labels), pol[:, None] * s[:, :L])
  np.testing.assert_allclose(ld[rows, :L, k], pol[:, None] * s[:, :L], atol=1e-5)
  np.testing.assert_allclose(lc[rows, :L, k], 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(b.H)[:, c.dim:, L], 0.0)
  # Only the task concept lives on the label side.
  other = np.ones((_B, c.num_concepts), bool)
  other[rows, k] = False
  assert np.abs(ld[:, :L][np.broadcast_to(other[:, None], ld[:, :L].shape)]).max() < 1e-5
  # The answer is the query's k*-sign under the prompt's polarity.
  np.testing.assert_array_equal(np.asarray(b.labels), pol * s[:, L])
  np.testing.assert_array_equal(np.asarray(b.correct), s[:, :L] == s[:, L:])


def test_mixtures_and_polarity_follow_the_config():
  # K = 5: concept 0 rare (weight 1/4), concepts 3, 4 of fixed polarity. Expected frequencies are
  # written out here, not taken from concept_probs.
  c = _task(num_concepts=5, dim=10, label_flip_prob=0.2, sign_balance=0.7, ood_skew=0.6,
            rare_concepts=1, rare_weight=0.25, fixed_polarity_concepts=2)
  n = 20000   # prompts of L = 1: the mixture and polarity do not depend on L, and they are cheap
  expected = {"train": [1 / 17, 4 / 17, 4 / 17, 4 / 17, 4 / 17],
              "test": [1 / 17, 4 / 17, 4 / 17, 4 / 17, 4 / 17],
              "skewed": [0.6, 0.1, 0.1, 0.1, 0.1], "switched": [0, 0, 0, 0.5, 0.5],
              "unseen": [0.2] * 5}
  for variant, p in expected.items():
    b = concepts.sample(jax.random.key(2), c, n, variant, 1)
    k, pol = np.asarray(b.task_concept), np.asarray(b.polarity)
    np.testing.assert_allclose(np.bincount(k, minlength=5) / n, p, atol=0.015, err_msg=variant)
    np.testing.assert_allclose(concepts.concept_probs(c, variant), p, atol=1e-12)
    assert np.all(pol ** 2 == 1)
    if variant == "switched":
      assert np.all(pol == -1)
      np.testing.assert_array_equal(np.asarray(b.labels), -np.asarray(b.signs)[:, -1])
      np.testing.assert_array_equal(np.asarray(b.demo_labels), -np.asarray(b.signs)[:, :-1])
    else:
      # Concepts 3, 4 never flip: switched semantics on them is outside training.
      assert np.all(pol[k >= 3] == 1), variant
      assert abs(np.mean(pol[k < 3] < 0) - 0.2) < 0.02, variant
  assert abs(np.mean(np.asarray(b.signs) > 0) - 0.7) < 0.01


def test_other_lengths_share_the_distribution():
  c = _rich()
  for L in (1, 2, 9):
    b = concepts.sample(jax.random.key(4), c, _B, "test", L)
    assert b.H.shape == (_B, 2 * c.dim, L + 1) and b.correct.shape == (_B, L)
    np.testing.assert_array_equal(np.asarray(b.labels), np.asarray(b.polarity * b.signs[:, L]))
  assert concepts.sample(jax.random.key(4), c, _B, "test").H.shape[-1] == c.n_context + 1


def test_unseen_uses_only_held_out_pairs_and_train_never():
  c = _rich()
  K = c.num_concepts
  held = {k: set(concepts.holdout_partners(c, k)) for k in range(K)}
  assert held[0] == {5, 6, 1, 2} and all(len(v) == 4 for v in held.values())
  assert concepts.holdout_partners(_task(), 0) == (1, 5)
  for variant in concepts.VARIANTS:
    b = concepts.sample(jax.random.key(6), c, _B, variant)
    k = np.asarray(b.task_concept)
    extra = np.asarray(b.extra_concepts)
    in_held = np.array([[[e in held[k[i]] for e in w] for w in extra[i]] for i in range(_B)])
    if variant == "unseen":
      assert in_held.all()
      assert len(np.unique(k)) == K
    else:
      assert not in_held.any(), variant
      # Held-out pairs are unordered: j ∈ H(k*) iff k* ∈ H(j).
      assert all(k[i] not in held[e] for i in range(_B) for w in extra[i] for e in w)


def test_sample_is_deterministic_jittable_and_test_is_held_out():
  c = _rich()
  key = jax.random.key(7)
  a, b = concepts.sample(key, c, _B), concepts.sample(key, c, _B)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  jitted = jax.jit(lambda k: concepts.sample(k, c, _B, "switched"))(key)
  eager = concepts.sample(key, c, _B, "switched")
  np.testing.assert_allclose(np.asarray(jitted.H), np.asarray(eager.H), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(jitted.labels), np.asarray(eager.labels))
  other = concepts.sample(jax.random.key(8), c, _B)
  assert not np.allclose(np.asarray(other.H), np.asarray(a.H))
  test = concepts.sample(key, c, _B, "test")
  assert not np.allclose(np.asarray(test.H), np.asarray(a.H))  # "test" never repeats "train"


def test_zero_labels_removes_exactly_the_label_rows():
  c = _rich(noise_std=0.1)
  b = concepts.sample(jax.random.key(9), c, _B)
  Z = np.asarray(concepts.zero_labels(b.H, c))
  np.testing.assert_array_equal(Z[:, c.dim:], 0.0)
  np.testing.assert_array_equal(Z[:, :c.dim], np.asarray(b.H)[:, :c.dim])
  assert np.abs(np.asarray(b.H)[:, c.dim:]).max() > 0.5


# ----------------------------------------------------------------------------- model


def _model(c, **kw):
  kw.setdefault("mlp_width", 8)
  return cm.ConceptTransformer(2 * c.dim, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("heads,loops", [(1, 1), (3, 1), (2, 3)])
def test_model_shapes_and_attention_is_a_distribution_over_demonstrations(heads, loops):
  c = _rich()
  m = _model(c, heads=heads, loops=loops)
  b = concepts.sample(jax.random.key(0), c, _B)
  assert m(b.H).shape == (_B,)
  attn = m.attention(b.H)
  assert attn.shape == (_B, heads, 6)
  np.testing.assert_allclose(np.sum(np.asarray(attn), -1), 1.0, rtol=1e-5)
  assert m.states(b.H)[1].shape == (loops, _B, heads, 6)
  with pytest.raises(ValueError, match="H.shape=.* is invalid"):
    m(b.H[:, 1:])
  with pytest.raises(ValueError, match="mlp_width=7 is invalid"):
    cm.ConceptTransformer(8, mlp_width=7, rngs=nnx.Rngs(0))


def test_output_layer_is_fixed_and_not_a_param():
  c = _rich()
  m = _model(c, mlp_width=6)
  np.testing.assert_allclose(np.asarray(m.a[...]), [1 / 6] * 3 + [-1 / 6] * 3)
  assert not isinstance(m.a, nnx.Param)
  assert set(nnx.state(m, nnx.Param).keys()) == {"W_Q", "W_K", "W_1"}
  a0, w0 = np.asarray(m.a[...]).copy(), np.asarray(m.W_1[...]).copy()
  opt = nnx.Optimizer(m, optax.sgd(0.5), wrt=nnx.Param)
  b = concepts.sample(jax.random.key(1), c, _B)
  grads = nnx.grad(lambda model: cm.logistic_loss(model(b.H), b.labels))(m)
  opt.update(m, grads)
  np.testing.assert_array_equal(np.asarray(m.a[...]), a0)
  assert not np.allclose(np.asarray(m.W_1[...]), w0)


def test_query_does_not_attend_to_itself():
  # Make the attention *query* blind to a direction u (W_Q u = 0), then move the query token along
  # u. Its query vector is unchanged, so the only way the weights on the demonstrations could
  # change is through the query's own key, i.e. if the query attended to itself.
  c = _rich()
  D = 2 * c.dim
  m = _model(c, heads=2)
  u = np.zeros(D, np.float32)
  u[3] = 1.0
  m.W_Q[...] = m.W_Q[...] * (1.0 - u)                       # W_Q^h u = 0 for every head.
  m.W_K[...] = m.W_K[...] + 5.0 * u[None, None, :] * jnp.ones((2, D, 1))  # keys react to u.
  b = concepts.sample(jax.random.key(2), c, _B)
  H = np.asarray(b.H)
  moved = H.copy()
  moved[:, :, -1] += 10.0 * u
  np.testing.assert_allclose(np.asarray(m.attention(jnp.asarray(moved))),
                             np.asarray(m.attention(b.H)), rtol=1e-5, atol=1e-7)
  # The same move on a demonstration does change the attention: the check can fail.
  moved_demo = H.copy()
  moved_demo[:, :, 0] += 10.0 * u
  assert not np.allclose(np.asarray(m.attention(jnp.asarray(moved_demo))),
                         np.asarray(m.attention(b.H)), atol=1e-3)
  # With W_Q = 0 all scores tie: exactly 1/L on each demonstration (1/(L+1) if self were in).
  m.W_Q[...] = jnp.zeros_like(m.W_Q[...])
  np.testing.assert_allclose(np.asarray(m.attention(b.H)), 1.0 / 6, rtol=1e-6)


def test_forward_matches_numpy_reference():
  c = _rich()
  m = _model(c, heads=2, loops=2, mlp_width=4)
  b = concepts.sample(jax.random.key(3), c, _B)
  H = np.asarray(b.H, np.float64)[:5]
  WQ, WK, W1 = (np.asarray(v[...], np.float64) for v in (m.W_Q, m.W_K, m.W_1))
  out = []
  for h in H:
    demos, z = h[:, :-1].T, h[:, -1]
    for _ in range(2):
      o = 0
      for j in range(2):
        s = (WQ[j] @ z) @ (WK[j] @ demos.T)
        w = np.exp(s - s.max())
        o = o + (w / w.sum()) @ demos
      z = z + o / 2
    r = np.maximum(W1 @ z, 0)
    out.append(r[:2].sum() / 4 - r[2:].sum() / 4)
  np.testing.assert_allclose(np.asarray(m(b.H))[:5], out, rtol=1e-4, atol=1e-6)


def test_logistic_loss_matches_numpy_and_is_stable():
  f = np.array([-800.0, -3.0, -0.1, 0.0, 0.5, 4.0, 900.0], np.float32)
  z = np.array([1, -1, 1, -1, 1, -1, -1], np.float32)
  ref = np.mean(np.logaddexp(0.0, -z.astype(np.float64) * f))
  got = float(cm.logistic_loss(jnp.asarray(f), jnp.asarray(z)))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  g = jax.grad(lambda x: cm.logistic_loss(x, jnp.asarray(z)))(jnp.asarray(f))
  assert np.all(np.isfinite(np.asarray(g)))


def test_zero_one_and_correct_attention():
  f = jnp.array([1.0, -2.0, 0.0, jnp.nan])
  z = jnp.array([1.0, 1.0, 1.0, 1.0])
  assert float(cm.zero_one(f, z)) == 0.75  # wrong sign, zero and NaN are errors.
  attn = jnp.array([[[0.7, 0.2, 0.1]], [[0.0, 0.5, 0.5]]])
  correct = jnp.array([[True, False, True], [False, False, True]])
  np.testing.assert_allclose(float(cm.correct_attention(attn, correct)), (0.8 + 0.5) / 2)
  np.testing.assert_allclose(float(cm.correct_attention(attn[:, 0], correct)), (0.8 + 0.5) / 2)


def test_alignment_is_one_in_the_concept_span_and_zero_outside():
  c = _task(num_concepts=3, dim=10)
  m = _model(c, mlp_width=4)
  P = diagnostics.concept_projector(c)
  assert np.isclose(np.trace(P), 4 * 3)
  dic = concepts.dictionary(c)
  W = np.zeros((4, 20))
  W[0, :10], W[1, 10:] = dic.b[:, 0], dic.d[:, 1]
  W[2, :10], W[3, 10:] = dic.a[:, 2], dic.c[:, 0]
  m.W_1[...] = jnp.asarray(W, jnp.float32)
  m.W_Q[...] = jnp.asarray(np.eye(20)[None], jnp.float32)
  m.W_K[...] = jnp.asarray(P[None], jnp.float32)
  al = diagnostics.alignment(m, c)
  assert al["alignment_mlp"] == pytest.approx(1.0, abs=1e-5)
  assert al["alignment_attention"] == pytest.approx(1.0, abs=1e-5)
  assert al["alignment_mlp_sign"] == pytest.approx(
      (0.5**2 + 1.0**2) / (0.5**2 + 3 * 1.0**2), abs=1e-5)  # the b and d rows of W.
  m.W_1[...] = jnp.asarray((np.eye(20) - P)[:4], jnp.float32)
  m.W_K[...] = jnp.asarray((np.eye(20) - P)[None], jnp.float32)
  al = diagnostics.alignment(m, c)
  assert al["alignment_mlp"] < 1e-6 and al["alignment_attention"] < 1e-6
  assert al["alignment_chance_mlp"] == pytest.approx(12 / 20)


def test_inner_products_match_a_constructed_model():
  # W_1 rows and B = W_Qᵀ W_K built from dictionary vectors: every inner product in closed form.
  c = _task(num_concepts=3, dim=10, noise_std=0.0)
  m = _model(c, mlp_width=4)
  dic = concepts.dictionary(c)
  W = np.zeros((4, 20))
  W[0, :10] = 2.0 * dic.b[:, 1] / 0.5 ** 2           # ⟨w_0, b_1⟩ = 2
  W[1, 10:] = -3.0 * dic.d[:, 2]                     # ⟨w_1, d_2⟩ = −3 (||d|| = 1)
  W[2, :10] = 0.5 * dic.a[:, 0]                      # ⟨w_2, a_0⟩ = 0.5
  m.W_1[...] = jnp.asarray(W, jnp.float32)
  Bm = np.zeros((20, 20))
  Bm[:10, :10] = 4.0 * np.outer(dic.b[:, 0], dic.b[:, 0]) / 0.5 ** 4   # b_0ᵀ B b_0 = 4
  Bm[:10, 10:] = 1.5 * np.outer(dic.a[:, 2], dic.c[:, 2])             # a_2ᵀ B c_2 = 1.5
  m.W_Q[...] = jnp.asarray(np.eye(20)[None], jnp.float32)
  m.W_K[...] = jnp.asarray(Bm[None], jnp.float32)
  ip = diagnostics.inner_products(m, c)
  expect = {"ip_mlp_sense_word": 2.0, "ip_mlp_sense_label": 3.0, "ip_mlp_shared_word": 0.5,
            "ip_mlp_shared_label": 0.0, "ip_attn_sense_word": 4.0, "ip_attn_sense_label": 0.0,
            "ip_attn_shared_word": 0.0, "ip_attn_shared_label": 1.5, "ip_mlp_noise": 0.0,
            "ip_attn_noise": 0.0}
  for k, v in expect.items():
    assert ip[k] == pytest.approx(v, abs=1e-5), k
  coef = diagnostics.mlp_coefficients(m, c)
  np.testing.assert_allclose(coef["mlp_sense_label"], W[:, 10:] @ dic.d, atol=1e-5)
  # Noise: the fixed draw, a numpy float64 reference of max |⟨w_r, ξ_j⟩|.
  c.noise_std = 0.3
  xi = diagnostics.noise_vectors(c)
  assert xi.shape == (diagnostics.NOISE_SAMPLES, 20) and np.std(xi) == pytest.approx(0.3, rel=0.05)
  np.testing.assert_array_equal(xi, diagnostics.noise_vectors(c))        # the same every call
  ip = diagnostics.inner_products(m, c)
  W32 = np.asarray(m.W_1[...], np.float64)
  assert ip["ip_mlp_noise"] == pytest.approx(np.abs(W32 @ xi.T).max(), rel=1e-9)


def test_evaluate_reports_every_variant_and_survives_nan():
  c = _rich(ood_lengths_short=(2, 3))
  m = _model(c)
  out = cm.evaluate(m, c, jax.random.key(0), _B)
  for k in ("test_zero_one", "test_cross_entropy", "test_zero_one_flipped", "correct_attention",
            "correct_attention_uniform", "attention_peak", "alignment_mlp", "alignment_attention",
            "ip_mlp_sense_label", "ip_attn_noise"):
    assert np.isfinite(out[k]), k
  assert set(out["ood"]) == set(concepts.OOD_VARIANTS)
  for v in out["ood"].values():
    assert 0 <= v["zero_one"] <= 1 and v["cross_entropy"] > 0 and v["nonfinite"] == 0
  lc = out["length_curve"]
  assert lc["n_context"] == [2, 3, 6, 9]
  assert lc["zero_one"][2] == out["test_zero_one"]
  # A length group pools its lengths (equal prompts each): the mean of their 0-1 losses.
  assert out["ood"]["length_short"]["zero_one"] == pytest.approx(np.mean(lc["zero_one"][:2]))
  assert out["ood"]["length_short"]["worst_zero_one"] == max(lc["zero_one"][:2])
  assert out["ood"]["length_long"]["zero_one"] == lc["zero_one"][3]
  # The short-prompt mechanism check: the share of L = 2 prompts whose demonstrations all have the
  # query's sense, recomputed from the same draw (evaluate's stream i = 1 is the first length).
  first = concepts.sample(jax.random.fold_in(jax.random.key(0), 1), c, _B, "test", 2)
  assert lc["share_no_opposite"][0] == np.mean(np.all(np.asarray(first.correct), -1))
  assert lc["share_no_same"][0] == np.mean(~np.any(np.asarray(first.correct), -1))
  assert all(np.isnan(z) or 0 <= z <= 1 for z in lc["zero_one_no_opposite"])
  assert len(out["mlp_sense_word"]) == 8 and len(out["mlp_sense_word"][0]) == c.num_concepts
  m.W_1[...] = jnp.full_like(m.W_1[...], jnp.nan)
  out = cm.evaluate(m, c, jax.random.key(0), _B)
  assert out["test_nonfinite"] == _B and out["test_zero_one"] == 1.0
  assert np.isinf(out["test_cross_entropy"])
  assert all(v["zero_one"] == 1.0 for v in out["ood"].values())
  assert out["ood"]["length_short"]["nonfinite"] == 2 * _B and out["ood"]["unseen"]["nonfinite"] == _B
  assert np.isnan(out["ip_mlp_sense_word"])
  # Undefined variants are skipped, not failed.
  c = _rich(fixed_polarity_concepts=0, ood_lengths_short=(), ood_lengths_long=())
  out = cm.evaluate(_model(c), c, jax.random.key(0), _B)
  assert set(out["ood"]) == {"skewed", "unseen"} and out["length_curve"]["n_context"] == [6]


# ----------------------------------------------------------------------------- training


def _train(c, steps, *, blind=False, seed=0, batch_size=64, lr=1e-2):
  model = cm.ConceptTransformer(2 * c.dim, **cm.default_model_config(), rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(lr, steps)), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, key):
    b = concepts.sample(key, c, batch_size)
    H = concepts.zero_labels(b.H, c) if blind else b.H
    loss, grads = nnx.value_and_grad(lambda m: cm.logistic_loss(m(H), b.labels))(model)
    opt.update(model, grads)
    return loss

  base = jax.random.key(1000 + seed)
  for i in range(steps):
    step(model, opt, jax.random.fold_in(base, i))
  return model


def _errors(model, c, *, blind=False, n=2000):
  """0-1 losses on "test": all prompts, the flipped and the unflipped ones (one sampler)."""
  b = concepts.sample(jax.random.key(1), c, n, "test")
  H = concepts.zero_labels(b.H, c) if blind else b.H
  wrong = ~(np.asarray(b.labels * model(H)) > 0)
  flipped = np.asarray(b.polarity) < 0
  return {"test": wrong.mean(), "flipped": wrong[flipped].mean(), "unflipped": wrong[~flipped].mean()}


# Every concept flips and the mixture is uniform: the flipped half of the test prompts is where a
# label-blind model must fail.
_UNIFORM = dict(fixed_polarity_concepts=0, rare_concepts=0)


def test_short_training_beats_chance_on_both_polarities():
  c = _task(**_UNIFORM)
  model = _train(c, 600)
  err = _errors(model, c)
  assert err["test"] < 0.1 and err["flipped"] < 0.1 and err["unflipped"] < 0.1, err
  al = diagnostics.alignment(model, c)
  assert al["alignment_mlp"] > al["alignment_chance_mlp"] + 0.2, al


@pytest.mark.parametrize("flip", [0.5, 0.1])
def test_label_blind_control_stays_at_chance_where_labels_are_needed(flip):
  # The same architecture and training, with the label rows zeroed in training and evaluation.
  # A flipped prompt has the same label-free input distribution as an unflipped one and the
  # negated answer, so a blind model's errors on the two polarities add up to 1: it cannot beat
  # chance on both, and it is wrong wherever it follows the more frequent mapping. (The model
  # that sees the labels, same training, is right on both: the test above.)
  c = _task(label_flip_prob=flip, **_UNIFORM)
  model = _train(c, 600, blind=True)
  err = _errors(model, c, blind=True)
  assert (err["unflipped"] + err["flipped"]) / 2 > 0.4, err
  if flip == 0.5:
    assert 0.4 < err["test"] < 0.6, err  # every prompt needs the labels: chance.
  else:
    # It learns the sign → label shortcut: right on the unflipped prompts, wrong on the others.
    assert err["test"] < 0.3 and err["flipped"] > 0.7, err
