"""The looped linear transformer (docs/theory.md §2).

One linear self-attention block, the same (P, Q) applied in every loop:

    Z_{t+1} = Z_t + (1/n) · P · Z_t M Z_tᵀ · Q · Z_t,      M = diag(1_n, 0_m)

M drops the m query columns from the keys and values, so a query only ever influences itself.
The read-out after loop t is Ŷ_t = −Z_t[d:, n:], the bottom-right d_out × m block.

`loop_readouts` is the pure function of arrays; `LoopedLinearTransformer` is the NNX module that
holds the parameters and calls it.  The default ("reassociated") form computes the D × D matrix
P (Z M Zᵀ) Q once per loop, O(n·D²); the textbook form P · Z M · (Zᵀ Q Z) builds the
(n+m) × (n+m) attention matrix, O(n²·D), and is kept only as a reference and benchmark baseline.

Kernels.  "xla" is the plain JAX code below, for every backend.  "cpu" runs the reassociated
loop, forward and backward, as one hand-vectorized C++ kernel through jax.ffi
(`loopicl/kernels/`): the same numbers to float32 rounding, ~7× faster on a CPU, where XLA runs
these small per-prompt products poorly (docs/scaling.md).  "auto" picks "cpu" when the run is on
one CPU device in float32 with the reassociated form and the kernel builds, else "xla".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from loopicl.errors import ConfigError

PARAMETERIZATIONS = ("blocks", "full", "gd")
ATTENTION_FORMS = ("reassociated", "textbook")
KERNELS = ("auto", "xla", "cpu")


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")


def loop_readouts(P: jax.Array, Q: jax.Array, Z0: jax.Array, *, loops: int, d_out: int,
                  n_queries: int = 1, form: str = "reassociated", remat: bool = False,
                  unroll: int | bool = 1, kernel: str = "xla", threads: int = 0) -> jax.Array:
  """Runs the loop and returns the read-out after every loop.

  Args:
    P, Q: [D, D] value and key-query matrices, D = d + d_out.
    Z0: [batch, D, n + m] prompts; the last m = n_queries columns are the queries.
    loops: T, the number of loops.
    d_out: rows of the read-out block.
    form: "reassociated" (O(n·D²) per loop) or "textbook" (O(n²·D)); same numbers.
    remat: rematerialize each loop in the backward pass (memory O(1) in T instead of O(T)).
    unroll: `lax.scan` unroll factor (True: fully unrolled).
    kernel: "xla" (plain JAX) or "cpu" (the fused C++ kernel; see the module docstring).
    threads: worker threads of the "cpu" kernel (0: XLA's intra-op pool size + 1).
  Returns:
    [loops, batch, d_out, m]: element t−1 is the prediction Ŷ_t = −Z_t[d:, n:] after t loops.
  """
  _check_positive_int("loops", loops)
  _check_positive_int("n_queries", n_queries)
  if form not in ATTENTION_FORMS:
    raise ValueError(f"form={form!r} is invalid; allowed: {' | '.join(ATTENTION_FORMS)}")
  D, columns = Z0.shape[-2], Z0.shape[-1]
  n = columns - n_queries
  if n < 1:
    raise ValueError(f"n_queries={n_queries} leaves n_context={n} columns; allowed: n_context >= 1")
  if P.shape != (D, D) or Q.shape != (D, D):
    raise ValueError(f"P and Q must be [{D}, {D}] for prompts with D={D} rows; got {P.shape}, {Q.shape}")
  d = D - d_out
  if kernel not in ("xla", "cpu"):
    raise ValueError(f"kernel={kernel!r} is invalid here; allowed: xla | cpu (resolve 'auto' first)")
  if kernel == "cpu":
    _check_cpu_kernel(form, Z0.dtype)
    from loopicl import kernels
    return kernels.fused_readouts(P.astype(Z0.dtype), Q.astype(Z0.dtype), Z0, n, d_out, loops,
                                  bool(remat), int(threads))
  step = _loop_step(P, Q, n, form)

  def one_loop(Z, _):
    Z = step(Z)
    return Z, -Z[..., d:, n:]

  if remat:
    one_loop = jax.checkpoint(one_loop)
  _, readouts = jax.lax.scan(one_loop, Z0, length=loops, unroll=unroll)
  return readouts


def _check_cpu_kernel(form: str, dtype) -> None:
  if form != "reassociated":
    raise ConfigError(f"model.kernel='cpu' computes the reassociated form; got model.form={form!r}; "
                     "allowed: form='reassociated', or kernel='xla'")
  if jnp.dtype(dtype) != jnp.float32:
    raise ConfigError(f"model.kernel='cpu' runs in float32; got {jnp.dtype(dtype).name}; allowed: "
                     "float32 inputs, or kernel='xla'")


def resolve_kernel(kernel: str, form: str = "reassociated", dtype=None) -> str:
  """"auto" → "cpu" on a single CPU device, float32, reassociated form, kernel buildable; else "xla".

  "cpu" is checked here too, so a run that cannot use it fails before training (one line).
  """
  if kernel not in KERNELS:
    raise ConfigError(f"model.kernel={kernel!r} is invalid; allowed: {' | '.join(KERNELS)}")
  dtype = jnp.dtype(dtype or jnp.result_type(float))
  if kernel == "xla":
    return kernel
  from loopicl import kernels
  if kernel == "cpu":
    _check_cpu_kernel(form, dtype)
    if jax.default_backend() != "cpu":
      raise ConfigError(f"model.kernel='cpu' runs on the CPU; the default backend is "
                       f"{jax.default_backend()}; allowed: kernel='xla' or 'auto'")
    if jax.device_count() > 1:
      # XLA cannot split a foreign call over a mesh; the kernel threads over the batch itself.
      raise ConfigError(f"model.kernel='cpu' runs on one device (it spreads the batch over the "
                       f"cores itself); this run has {jax.device_count()}; allowed: cpu_devices=1 "
                       "on one process, or kernel='xla' | 'auto'")
    kernels.lanes()  # builds and registers, or raises KernelUnavailable (one line)
    return kernel
  usable = (jax.default_backend() == "cpu" and jax.device_count() == 1 and form == "reassociated"
            and dtype == jnp.float32)
  if not usable:
    return "xla"
  try:
    kernels.lanes()
  except kernels.KernelUnavailable as e:
    kernels.warn_xla_fallback(e)  # one warning per process: the cause, and XLA's ~7x cost
    return "xla"
  return "cpu"


def _loop_step(P, Q, n: int, form: str):
  """One application of the block, Z -> Z + (1/n) P Z M Zᵀ Q Z, in the chosen form."""
  def step(Z):
    context = Z[..., :n]                                   # [batch, D, n]: M keeps the context.
    if form == "reassociated":
      gram = context @ jnp.swapaxes(context, -1, -2)       # Z M Zᵀ: [batch, D, D]
      return Z + ((P @ gram @ Q) / n) @ Z                  # O(n·D²)
    attention = jnp.swapaxes(context, -1, -2) @ Q @ Z      # M Zᵀ Q Z without the zero rows: [batch, n, n + m]
    return Z + (P @ context @ attention) / n               # O(n²·D)
  return step


def loop_states(P: jax.Array, Q: jax.Array, Z0: jax.Array, *, loops: int, n_queries: int = 1,
                form: str = "reassociated") -> jax.Array:
  """Every prompt matrix Z_1 … Z_T: [loops, batch, D, n + m] (for inspection, not training)."""
  _check_positive_int("loops", loops)
  n = Z0.shape[-1] - n_queries
  step = _loop_step(P, Q, n, form)
  _, states = jax.lax.scan(lambda Z, _: (step(Z),) * 2, Z0, length=loops)
  return states


def gd_weights(A: jax.Array, d_out: int) -> tuple[jax.Array, jax.Array]:
  """(P, Q) of the GD construction with preconditioner A: P = [[0,0],[0,I]], Q = [[−A,0],[0,0]]."""
  d = A.shape[-1]
  D = d + d_out
  P = jnp.zeros((D, D), A.dtype).at[d:, d:].set(jnp.eye(d_out, dtype=A.dtype))
  Q = jnp.zeros((D, D), A.dtype).at[:d, :d].set(-A)
  return P, Q


def blocks_weights(P_yy: jax.Array, Q_xx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(P, Q) with P[d:, d:] = P_yy, Q[:d, :d] = Q_xx and every other entry 0."""
  d, d_out = Q_xx.shape[-1], P_yy.shape[-1]
  D = d + d_out
  P = jnp.zeros((D, D), P_yy.dtype).at[d:, d:].set(P_yy)
  Q = jnp.zeros((D, D), Q_xx.dtype).at[:d, :d].set(Q_xx)
  return P, Q


class LoopedLinearTransformer(nnx.Module):
  """A linear attention block whose weights are shared across `loops` applications.

  Parameterizations:
    * "blocks": only the GD construction's blocks are parameters — P_yy = P[d:, d:] ([d_out, d_out])
                and Q_xx = Q[:d, :d] ([d, d]), entries ~ N(0, init_scale²); every other entry of
                P and Q is the constant 0 (d² + d_out² parameters).  The class W ← W − (1/n)(WX − Y)XᵀA
                with A = −Q_xx and the y-row scaled by P_yy: preconditioned GD with any A;
    * "full":   every entry of P and Q free, ~ N(0, init_scale²) (2·D² parameters);
    * "gd":     P = [[0,0],[0,I]] fixed, Q = [[−A,0],[0,0]], only A ([d, d], init init_scale·I).
  The blocks draw is the same-key draw of "full" restricted to the blocks, so the two start equal
  on them.
  """

  def __init__(self, d: int, d_out: int = 1, parameterization: str = "full", *,
               init_scale: float = 0.05, remat: bool = False, unroll: int | bool = 1,
               form: str = "reassociated", kernel: str = "xla", threads: int = 0, dtype=None,
               rngs: nnx.Rngs):
    _check_positive_int("d", d)
    _check_positive_int("d_out", d_out)
    if parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"parameterization={parameterization!r} is invalid; allowed: "
                       f"{' | '.join(PARAMETERIZATIONS)}")
    if form not in ATTENTION_FORMS:
      raise ValueError(f"form={form!r} is invalid; allowed: {' | '.join(ATTENTION_FORMS)}")
    self.d, self.d_out, self.parameterization = d, d_out, parameterization
    if kernel not in KERNELS:
      raise ConfigError(f"model.kernel={kernel!r} is invalid; allowed: {' | '.join(KERNELS)}")
    self.remat, self.unroll, self.form = remat, unroll, form
    dtype = dtype or jnp.result_type(float)
    # The kernel as asked for ("auto" included): resolved when a step is built or the model is
    # called, never here — building a model (e.g. to evaluate a run) must not build the kernel.
    self.kernel, self.threads = kernel, threads
    D = d + d_out
    if parameterization == "gd":
      self.A = nnx.Param(init_scale * jnp.eye(d, dtype=dtype))
    else:
      P = init_scale * jax.random.normal(rngs.params(), (D, D), dtype)
      Q = init_scale * jax.random.normal(rngs.params(), (D, D), dtype)
      if parameterization == "full":
        self.P, self.Q = nnx.Param(P), nnx.Param(Q)
      else:
        self.P_yy, self.Q_xx = nnx.Param(P[d:, d:]), nnx.Param(Q[:d, :d])

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """The effective (P, Q), each [D, D], whatever the parameterization."""
    if self.parameterization == "full":
      return self.P[...], self.Q[...]
    if self.parameterization == "blocks":
      return blocks_weights(self.P_yy[...], self.Q_xx[...])
    return gd_weights(self.A[...], self.d_out)

  def __call__(self, Z0: jax.Array, loops: int, n_queries: int = 1, kernel: str | None = None) -> jax.Array:
    """Z0: [batch, D, n + m] -> read-outs [loops, batch, d_out, m] (element t−1: after t loops).

    kernel: "xla" | "cpu", already resolved (the training step passes its own); None: the
    model's, resolved now if it is "auto".
    """
    P, Q = self.weights()
    if kernel is None:
      kernel = resolve_kernel(self.kernel, self.form, Z0.dtype)
    return loop_readouts(P, Q, Z0, loops=loops, d_out=self.d_out, n_queries=n_queries,
                         form=self.form, remat=self.remat, unroll=self.unroll,
                         kernel=kernel, threads=self.threads)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def jitted_readouts(P, Q, Z0, loops, d_out, n_queries):
  """`loop_readouts` on the plain XLA path, jitted: [loops, batch, d_out, m] (evaluation)."""
  return loop_readouts(P, Q, Z0, loops=loops, d_out=d_out, n_queries=n_queries)
