"""The `task` section of the concept task: every knob with its default, and its validation.

`loopicl/concepts/task.py` (the sampler) re-exports everything here; the knobs are described
there and in docs/theory.md §5.
"""
from __future__ import annotations

import ml_collections
import numpy as np

KIND = "concept_classification"
VARIANTS = ("train", "test", "skewed", "switched", "unseen")
# The report's out-of-distribution entries: two length groups ("test" prompts of other lengths)
# and the three sampler variants.
OOD_VARIANTS = ("length_short", "length_long", "skewed", "switched", "unseen")


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
  c.label_flip_prob = 0.5       # P(π = −1) on a flipping concept: makes labels necessary.
  c.fixed_polarity_concepts = 2  # the last f concepts never flip in training ("switched" tests them).
  c.rare_concepts = 2           # the first r concepts are rare in training ("skewed" favours them).
  c.rare_weight = 0.1           # training weight of a rare concept relative to a common one (1).
  c.dictionary_seed = 0         # seed of the one concept dictionary shared by all prompts.
  c.ood = ml_collections.ConfigDict()
  c.ood.lengths_short = (2, 4, 8)   # "length_short": L values below n_context.
  c.ood.lengths_long = (32, 64)     # "length_long": L values above n_context.
  c.ood.skew = 0.8              # "skewed": P(k* is a rare concept).
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
                     ("concepts_per_word", 0), ("fixed_polarity_concepts", 0),
                     ("rare_concepts", 0)):
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
  if c.fixed_polarity_concepts > K - 1:
    _fail("fixed_polarity_concepts", c.fixed_polarity_concepts,
          f"an integer in [0, num_concepts − 1 = {K - 1}] (some concept must flip)")
  if c.rare_concepts > K - 1:
    _fail("rare_concepts", c.rare_concepts, f"an integer in [0, num_concepts − 1 = {K - 1}]")
  if not _is_num(c.rare_weight) or not 0 < c.rare_weight <= 1:
    _fail("rare_weight", c.rare_weight, "a number in (0, 1]")
  for field in ("lengths_short", "lengths_long"):
    v = c.ood[field]
    if not isinstance(v, (tuple, list)) or not all(_is_int(x) and x >= 1 for x in v):
      _fail(f"ood.{field}", v, "a tuple of integers >= 1 (empty: not measured)")
  if not _is_num(c.ood.skew) or not 0 <= c.ood.skew <= 1:
    _fail("ood.skew", c.ood.skew, "a number in [0, 1]")
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
  held-out partners, "switched" fixed-polarity concepts, "skewed" rare concepts)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is invalid; allowed: {' | '.join(VARIANTS)}")
  c = task_config
  if variant == "unseen":
    held = len(holdout_partners(c, 0))
    if held < c.concepts_per_word or c.concepts_per_word < 1:
      _fail("ood.unseen_holdout", c.ood.unseen_holdout,
            f"for variant='unseen', an integer h >= 1 with min(2h, K − 1) >= concepts_per_word "
            f"= {c.concepts_per_word} >= 1")
  if variant == "switched" and c.fixed_polarity_concepts < 1:
    _fail("fixed_polarity_concepts", c.fixed_polarity_concepts,
          "for variant='switched', an integer >= 1 (switched semantics on concepts that never "
          "flipped in training)")
  if variant == "skewed" and c.rare_concepts < 1:
    _fail("rare_concepts", c.rare_concepts, "for variant='skewed', an integer >= 1")
