"""Multi-concept semantic ICL (Bu et al., NeurIPS 2024; docs/theory.md §5).

Softmax attention (query -> demonstrations) + a ReLU MLP with a fixed ±1/m output layer, trained
with the logistic loss and plain SGD on prompts whose words are sparse sums of concept vectors.

  python scripts/train.py --config configs/concepts.py --workdir runs/concepts
  python scripts/evaluate.py --workdir runs/concepts
"""
from loopicl import config as config_lib


def get_config():
  config = config_lib.defaults("concept_classification")  # every field; docs/theory.md §5 for task
  config.task.num_concepts = 6              # K
  config.task.dim = 32                      # embedding dimension (>= 2K)
  config.task.concepts_per_word = 1         # extra random concepts per word
  config.task.n_context = 16                # L demonstrations
  config.task.label_flip_prob = 0.5         # per-prompt label polarity: the labels must be read
  config.task.fixed_polarity_concepts = 2   # concepts 4, 5 never flip in training: "switched" is OOD
  config.task.rare_concepts = 2             # concepts 0, 1 are rare in training ...
  config.task.rare_weight = 0.1             # ... 0.1 the weight of a common one (2.4% of prompts each)
  config.task.ood.skew = 0.8                # "skewed": 80% of test prompts on the rare concepts
  config.task.ood.lengths_short = (2, 4, 8)
  config.task.ood.lengths_long = (32, 64)

  config.model.loops = 1                    # shared-weight loops of attention (1: the paper's model)
  config.model.heads = 1                    # softmax attention heads
  config.model.mlp_width = 32               # m: ReLU neurons; output layer fixed at ±1/m
  config.model.init_scale = 3.0             # weights ~ N(0, init_scale² / (2·dim)); 1.0 misses the OOD targets

  # The paper's optimiser: plain SGD, constant step size, no clipping (docs/concepts.md: the search
  # over learning rate and momentum that chose it). configs/concepts_adam.py is the Adam variant.
  config.train.steps = 3000
  config.train.batch_size = 128
  config.train.optimizer = "sgd"
  config.train.learning_rate = 10.0         # 3: 0.8% test error at 2000 steps; 30: unstable
  config.train.momentum = 0.0               # 0.9 with lr 1 measured the same as 0 with lr 10
  config.train.schedule = "constant"
  config.train.warmup_steps = 0
  config.train.grad_clip = 0.0              # off
  config.train.curriculum_start = 0
  config.eval.every = 50                    # dense enough to see the 0-1 loss fall on a log axis
  config.eval.num_prompts = 4096
  config.checkpoint.every = 1000
  return config
