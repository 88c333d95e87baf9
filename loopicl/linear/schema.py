"""The linear family's part of the config schema: the `model` fields and the `linear` section,
every field at its default, the defaults that follow other fields, and their validation.

The defaults are the default recipe (docs/learning.md): the GD construction's blocks learned from
random init (`parameterization = "blocks"`), tail-holding batches with the candidate pool of
`tail_sampling.auto_pool`, a loop curriculum and 500 + 1000·√κ_Σ steps at T.
"""
from __future__ import annotations

import ml_collections

from loopicl import fields as config_lib
from loopicl.linear import model as model_lib, tasks

MODEL_INITS = ("random", "gd")  # model.init: random weights | the GD construction (step init_step) + noise
LOSS_NORMALIZATIONS = ("none", "gd")


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.parameterization = "blocks"  # blocks: only P_yy, Q_xx (the GD construction's blocks) are parameters,
                                 # every other entry a constant 0 | full: every entry of P and Q trained |
                                 # gd: only A in Q = [[-A,0],[0,0]] (docs/theory.md §2)
  m.init_scale = 1e-6            # blocks/full: entries ~ N(0, init_scale²); gd: A = init_scale·I
  m.init = "random"              # random | gd: warm start at the GD construction with step init_step
                                 # (+ the random draw as noise for blocks/full; A = init_step·I for gd)
  m.init_step = 0.1              # η₀ of the gd warm start (small: contractive on every prompt)
  m.remat = False                # jax.checkpoint each loop (memory O(1) in T)
  m.unroll = 1                   # lax.scan unroll factor over loops
  m.form = "reassociated"        # reassociated: P (Z M Zᵀ) Q Z, O(n·D²) | textbook: O(n²·D) (benchmarks)
  m.kernel = "auto"              # xla: plain JAX | cpu: the fused C++ loop kernel (~7× on a CPU) |
                                 # auto: cpu on one CPU device in float32, else xla (linear/model.py)
  m.kernel_threads = 0           # threads of the cpu kernel (0: XLA's intra-op pool + 1)
  return m


def section_config() -> ml_collections.ConfigDict:
  """The `linear` section: how the linear family draws training batches and scores them."""
  s = ml_collections.ConfigDict()
  # Tail-holding batches (linear/tail_sampling.py): each batch is drawn from tail_pool·batch_size
  # candidates and always keeps the tail_prompts of largest whitened λ_max(Σ̂), weighted to
  # their true share (unbiased).  tail_pool: "auto" (tail_sampling.auto_pool: 8, or 64 where
  # T ≥ 20 and n < 3d) or a count as a string ("64": the field is a string so that the command
  # line can set either); "1" or tail_prompts = 0: uniform batches.
  s.tail_pool = "auto"
  s.tail_prompts = 16            # linked: train.batch_size // 8
  s.loss_loops = 1               # the loss averages the query MSE over the last k loops
  s.loss_normalization = "none"  # none | gd: each loop's MSE divided by GD's after as many steps
  s.extrapolation = 4            # evaluations also read the model at loops 1 … extrapolation·T
  return s


def link(c) -> None:
  """train.steps = T·curriculum_every + 1000·√κ_Σ + 500 (the curriculum, then learning Σ⁻¹ takes
  longer the worse Σ is conditioned: 500·√κ_Σ left κ_Σ = 100 rotated at T = 10 and 20 at 1.2× and
  53× PGD's mean); linear.tail_prompts = train.batch_size // 8."""
  loops = ml_collections.FieldReference(c.model.loops, field_type=int)
  kappa = ml_collections.FieldReference(c.task.condition_number, field_type=float)
  every = ml_collections.FieldReference(c.train.curriculum_every, field_type=int)
  batch = ml_collections.FieldReference(c.train.batch_size, field_type=int)
  c.model.loops, c.task.condition_number = loops, kappa
  c.train.curriculum_every, c.train.batch_size = every, batch
  c.train.steps = loops * every + ((kappa ** 0.5) * 1000.0).to_int() + 500
  c.linear.tail_prompts = batch // 8


def validate(cfg) -> None:
  config_lib.check_task(tasks.validate, cfg.task)
  config_lib.field_choice(cfg, "model", "parameterization", model_lib.PARAMETERIZATIONS)
  config_lib.field_real(cfg, "model", "init_scale", 0.0, strict=True)
  config_lib.field_choice(cfg, "model", "init", MODEL_INITS)
  config_lib.field_real(cfg, "model", "init_step", 0.0, strict=True)
  config_lib.field_bool(cfg, "model", "remat")
  config_lib.field_int(cfg, "model", "unroll")
  config_lib.field_choice(cfg, "model", "form", model_lib.ATTENTION_FORMS)
  config_lib.field_choice(cfg, "model", "kernel", model_lib.KERNELS)
  config_lib.field_int(cfg, "model", "kernel_threads", low=0)
  pool = cfg.linear.tail_pool
  if pool != "auto" and not (isinstance(pool, str) and pool.isdigit() and int(pool) >= 1):
    config_lib.fail("linear.tail_pool", pool, '"auto" | a count >= 1 as a string ("8")')
  config_lib.field_int(cfg, "linear", "tail_prompts", 0)
  if cfg.linear.tail_prompts >= cfg.train.batch_size:
    config_lib.fail("linear.tail_prompts", cfg.linear.tail_prompts,
                    f"an integer in [0, train.batch_size={cfg.train.batch_size})")
  config_lib.field_int(cfg, "linear", "loss_loops")
  if cfg.linear.loss_loops > cfg.model.loops:
    config_lib.fail("linear.loss_loops", cfg.linear.loss_loops,
                    f"an integer in [1, model.loops={cfg.model.loops}]")
  config_lib.field_choice(cfg, "linear", "loss_normalization", LOSS_NORMALIZATIONS)
  config_lib.field_int(cfg, "linear", "extrapolation")
