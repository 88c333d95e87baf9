"""Default experiment: learn a 5-loop linear transformer from random init on in-context regression.

Every field and its default is the schema (`loopicl.config.defaults`: the generic `train`,
`eval`, `checkpoint` sections in loopicl/config.py; the linear family's `task`, `model` and
`linear` sections in loopicl/linear/schema.py, each field commented there).  The defaults are
this recipe (docs/learning.md):

  * model.parameterization = "blocks": only P_yy and Q_xx, the GD construction's blocks, are
    parameters (every other entry of P and Q is a constant 0), from N(0, (1e-6)²);
  * a loop curriculum 1 → T, one loop every 100 steps, then 500 + 1000·√κ_Σ steps at T
    (train.steps follows model.loops and task.condition_number);
  * SOAP (Adam in the eigenbasis of Shampoo's factors) at 1e-2, β2 = 0.99, cosine schedule after a
    300-step warm-up, global-norm clipping at 100;
  * tail-holding batches: the 1/8 of each batch with the largest whitened λ_max(Σ̂), from
    linear.tail_pool = "auto" candidates (8×, 64× where T ≥ 20 and n < 3d), at their true weight;
  * up to 5 non-finite steps in a row skipped.

The default run (T = 5, d = 10, n = 40) takes about a minute on a 2-core CPU; every evaluation
also reads the model at loops 1 … 4T.

  python scripts/train.py --config configs/default.py --workdir runs/default
  python scripts/train.py --config configs/default.py --workdir runs/t10 --config.model.loops=10
  python scripts/train.py --config configs/default.py --workdir runs/free --config.model.parameterization=full
"""
import ml_collections

from loopicl import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  return config_lib.defaults("linear_regression")
