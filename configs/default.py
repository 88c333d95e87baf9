"""Default experiment: learn a 5-loop linear transformer on isotropic in-context regression.

A small run that finishes in about a minute on a 2-core CPU and ends at or below the error of
gradient descent with the best constant step at the same number of steps.

  python scripts/train.py --config configs/default.py --workdir runs/default
  python scripts/train.py --config configs/default.py --workdir runs/t10 --config.model.loops=10
"""
import ml_collections

from loopicl import tasks


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # The in-context task distribution (docs/theory.md §1).
  config.task = tasks.default_config()
  config.task.kind = "linear_regression"  # linear_regression | vector_generation | concept_classification
  config.task.d = 10                # input dimension
  config.task.d_out = 1             # output dimension
  config.task.n_context = 40        # in-context examples per prompt (n = 4d: κ̂ ≈ 9)
  config.task.n_queries = 1         # query columns per prompt (vector_generation uses d)
  config.task.condition_number = 1.0  # κ_Σ of the input covariance (1: isotropic)
  config.task.rotate = False        # random eigenbasis for Σ
  config.task.covariance_seed = 0   # seed of the one Σ shared by all prompts
  config.task.noise_std = 0.0       # label noise σ
  config.task.weight_scale = 1.0    # W* entries ~ N(0, weight_scale² / d)

  # The looped transformer (docs/theory.md §2).
  config.model = ml_collections.ConfigDict()
  config.model.parameterization = "full"  # full: P, Q free | gd: only A in Q = [[-A,0],[0,0]]
  config.model.loops = 5            # T: loops of the shared block at the end of training
  config.model.init_scale = 0.01    # full: P, Q ~ N(0, init_scale²); gd: A = init_scale·I (0.05 stalls at T = 5)
  config.model.init = "gd"          # random: P, Q ~ N(0, init_scale²) | gd: the GD construction with step
                                    # init_step plus that noise (full), or A = init_step·I (gd); at T = 20 it also
                                    # needs a loop curriculum (docs/reproduction.md)
  config.model.init_step = 0.1      # η₀ of the gd warm start (small: contractive on every prompt)
  config.model.remat = False        # jax.checkpoint each loop (memory O(1) in T)
  config.model.unroll = 1           # lax.scan unroll factor over loops
  config.model.form = "reassociated"  # reassociated: P (Z M Zᵀ) Q Z, O(n·D²) | textbook: O(n²·D) (benchmarks)
  config.model.kernel = "auto"      # xla: plain JAX | cpu: fused C++ loop kernel (jax.ffi, ~7x on a CPU) |
                                    # auto: cpu on one CPU device in float32, else xla (loopicl/linear/model.py)
  config.model.kernel_threads = 0   # threads of the cpu kernel (0: XLA's intra-op pool + 1)

  # Optimisation. Tasks are sampled fresh every step from fold_in(key(seed), step).
  config.train = ml_collections.ConfigDict()
  config.train.seed = 0             # parameter init and training-data seed
  config.train.steps = 3000         # optimizer steps
  config.train.batch_size = 128     # prompts per step
  config.train.optimizer = "adam"   # adam | adamw | sgd
  config.train.learning_rate = 2e-3  # peak learning rate
  config.train.schedule = "cosine"  # constant | cosine (decay to 0 after warm-up)
  config.train.warmup_steps = 300   # linear warm-up from 0 (shorter warm-ups blow up on some seeds)
  config.train.grad_clip = 1.0      # global-norm clipping (0: off)
  config.train.weight_decay = 0.0   # adamw only
  config.train.momentum = 0.9       # sgd only
  config.train.loss_loops = 1       # average the MSE over the last k loops (1: last loop only)
  config.train.loss_normalization = "none"  # none | gd: divide each loop's MSE by GD's at that loop
  config.train.curriculum_start = 0  # loop curriculum: start at this many loops (0: off) …
  config.train.curriculum_every = 500  # … and add curriculum_increment loops every this many steps
  config.train.curriculum_increment = 1
  config.train.construction_steps = 0  # full: for the first k steps only P_yy and Q_xx (the GD
                                    # construction's blocks) move, the rest stays at init (0: off)
  config.train.steps_per_call = 50  # optimizer steps per jitted call (lax.scan): amortises dispatch
  config.train.log_every = 100      # train scalars to TensorBoard every this many steps

  # Evaluation during training on a fixed held-out set of prompts.
  config.eval = ml_collections.ConfigDict()
  config.eval.every = 500           # evaluate every this many steps (and at the end)
  config.eval.num_prompts = 2048    # held-out prompts
  config.eval.seed = 1234           # seed of the held-out prompts (independent of train.seed)

  # Orbax checkpoints in workdir/checkpoints.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1000    # save every this many steps (and at the end)
  config.checkpoint.keep = 3        # keep the newest this many checkpoints

  config.distributed = False        # call jax.distributed.initialize() (multi-host; docs/scaling.md)
  config.cpu_devices = 0            # split the host CPU into this many devices, batch sharded over
                                    # them (0: JAX's default, one); 2 on a 2-core host ≈ 1.5-2× steps/s
  return config
