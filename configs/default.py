"""Default experiment: learn a 5-loop linear transformer from random init on in-context regression.

The recipe (docs/learning.md, chosen by measurement): P_yy, Q_xx ~ N(0, (1e-6)²), the GD
construction's blocks, are the only ones updated (the others start and stay at 0); a loop
curriculum 1 → T, one loop every 100 steps, then 500 + 1000·√κ_Σ steps at T (train.steps follows
model.loops and task.condition_number); SOAP (Adam in the eigenbasis of Shampoo's factors) 1e-2
with β2 = 0.99, a cosine schedule and gradient clipping at 100; tail-holding batches (the 1/8
of each batch with the largest whitened λ_max(Σ̂), from 8× as many candidates — 64× at T ≥ 20
with n < 3d — at their true weight); up to 5 non-finite steps in a row skipped.  The
default run (T = 5) takes under a minute on a 2-core CPU and ends below GD with the best constant
step; every evaluation also reads the model at loops 1 … 4T.

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
  d = ml_collections.FieldReference(10, field_type=int)
  n = ml_collections.FieldReference(40, field_type=int)
  config.task.d = d                 # input dimension
  config.task.d_out = 1             # output dimension
  config.task.n_context = n         # in-context examples per prompt (n = 4d: κ̂ ≈ 9)
  config.task.n_queries = 1         # query columns per prompt (vector_generation uses d)
  kappa = ml_collections.FieldReference(1.0, field_type=float)
  config.task.condition_number = kappa  # κ_Σ of the input covariance (1: isotropic)
  config.task.rotate = False        # random eigenbasis for Σ
  config.task.covariance_seed = 0   # seed of the one Σ shared by all prompts
  config.task.noise_std = 0.0       # label noise σ
  config.task.weight_scale = 1.0    # W* entries ~ N(0, weight_scale² / d)

  # The looped transformer (docs/theory.md §2).  T is a reference: the step count follows it.
  loops = ml_collections.FieldReference(5, field_type=int)
  config.model = ml_collections.ConfigDict()
  config.model.parameterization = "full"  # full: P, Q free | gd: only A in Q = [[-A,0],[0,0]]
  config.model.loops = loops        # T: loops of the shared block at the end of training
  config.model.init_scale = 1e-6    # full: P, Q ~ N(0, init_scale²); gd: A = init_scale·I.  With the
                                    # construction mask on for the whole run only P_yy, Q_xx are drawn and
                                    # the rest start at 0: frozen at 1e-4 they left a 4e-8 error floor
                                    # (n/d = 8, T = 20), at 1e-6 a 1e-11 one (docs/learning.md)
  config.model.init = "random"      # random: P, Q ~ N(0, init_scale²) (from scratch, docs/learning.md) |
                                    # gd: warm start at the GD construction with step init_step plus that
                                    # noise (full), or A = init_step·I (gd)
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
  every = ml_collections.FieldReference(100, field_type=int)
  # Optimizer steps: the curriculum's T·every, then 500 + 1000·√κ_Σ at T (1500 at κ_Σ = 1, 10 500 at
  # κ_Σ = 100: learning Σ⁻¹ takes longer the worse Σ is conditioned; 500·√κ_Σ left κ_Σ = 100 rotated
  # at T = 10 and 20 at 1.2× and 53× PGD's mean; docs/learning.md).
  config.train.steps = loops * every + ((kappa ** 0.5) * 1000.0).to_int() + 500
  batch = ml_collections.FieldReference(128, field_type=int)
  config.train.batch_size = batch   # prompts per step
  config.train.optimizer = "soap"   # adam | adamw | sgd | soap (Adam in Shampoo's eigenbasis, loopicl/soap.py).
                                    # soap: rotation-equivariant — with Adam a rotated κ_Σ = 100 Σ met PGD's
                                    # median on 2 of 8 seeds (n/d 4 and 8; docs/learning.md round 5)
  config.train.learning_rate = 1e-2  # peak learning rate (2e-3 ends 4x above PGD at κ_Σ = 10: too slow)
  config.train.schedule = "cosine"  # constant | cosine (decay to 0 after warm-up)
  config.train.warmup_steps = 300   # linear warm-up from 0 (shorter warm-ups blow up on some seeds)
  config.train.adam_b2 = 0.99       # adam / adamw / soap: decay of the second moment v.  0.999 stalls
                                    # where the loss falls by decades (n/d = 8, T = 20: 511× PGD)
  config.train.adam_eps = 1e-8       # adam / adamw / soap: ε of the denominator √v + ε
  config.train.grad_clip = 100.0    # global-norm clipping (0: off), a guard against one extreme batch.
                                    # Lower, it cuts the tail's gradient: 1 left n/d = 1.5, T = 20 at
                                    # 10³-10⁵× GD's mean, 10 at 2-12× over 65 536 prompts (docs/learning.md)
  config.train.weight_decay = 0.0   # adamw only
  config.train.momentum = 0.9       # sgd only
  config.train.shampoo_decay = 0.99  # soap only: EMA decay of the factors GGᵀ, GᵀG
  config.train.precondition_every = 10  # soap only: recompute their eigenbases every this many steps
  config.train.loss_loops = 1       # average the MSE over the last k loops (1: last loop only)
  config.train.loss_normalization = "none"  # none | gd: divide each loop's MSE by GD's at that loop
  config.train.curriculum_start = 1  # loop curriculum: start at this many loops (0: off) …
  config.train.curriculum_every = every  # … and add curriculum_increment loops every this many steps
  config.train.curriculum_increment = 1
  config.train.construction_steps = -1  # full: for the first k steps only P_yy and Q_xx (the GD
                                    # construction's blocks) move, the rest stays at init (0: off, -1: the
                                    # whole run).  -1 by default: the other blocks, once free, grow to ~1/3 of
                                    # the weight and end 3-900x above GD/PGD (docs/learning.md)
  # Tail-holding batches: draw each batch from tail_pool·batch_size candidates, always keep the
  # tail_prompts of largest whitened λ_max(Σ̂), weighted to their true share (unbiased; linear
  # family, loopicl/linear/tail_sampling.py).  1 / 0: uniform batches, which at n/d = 1.5, T = 20
  # miss the mean on 4 of 4 seeds.  The pool is 8, and 64 where the loops are deep (T ≥ 20) on few
  # examples (d ≤ n < 3d): there the prompts that decide the mean are ~0.1% of the population, and
  # with 8 the mean over 65 536 prompts was 1.7-12× GD's on 3 of 4 seeds at n/d = 1.5 and 1.9-3.2×
  # on 2 of 4 at n/d = 2 (64: 0.62-0.69× and 0.15-0.17×); 64 costs ~2-4× the step, so only there
  # (docs/learning.md).  In integers: (T // 20)·((3d − 1) // n) is 1 exactly there for T ≤ 39
  # (more candidates deeper or with fewer examples still).
  config.train.tail_pool = 8 + 56 * (loops // 20) * ((3 * d - 1) // n)
  config.train.tail_prompts = batch // 8
  config.train.nonfinite_skips = 5  # skip up to this many non-finite steps in a row (state unchanged,
                                    # next batch) before the run stops with its last good state
  config.train.steps_per_call = 50  # optimizer steps per jitted call (lax.scan): amortises dispatch
  config.train.log_every = 100      # train scalars to TensorBoard every this many steps

  # Evaluation during training on a fixed held-out set of prompts.
  config.eval = ml_collections.ConfigDict()
  config.eval.every = 500           # evaluate every this many steps (and at the end)
  config.eval.num_prompts = 2048    # held-out prompts
  config.eval.seed = 1234           # seed of the held-out prompts (independent of train.seed)
  config.eval.extrapolation = 4     # also read the model at loops 1 … 4T (does it hold past T?)

  # Orbax checkpoints in workdir/checkpoints.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1000    # save every this many steps (and at the end)
  config.checkpoint.keep = 3        # keep the newest this many checkpoints

  config.distributed = False        # call jax.distributed.initialize() (multi-host; docs/scaling.md)
  config.cpu_devices = 0            # split the host CPU into this many devices, batch sharded over
                                    # them (0: JAX's default, one); 2 on a 2-core host ≈ 1.5-2× steps/s
  return config
