"""Why Adam's β2 matters at T = 20 (docs/learning.md, "Adam's memory"): full-batch Adam on the
mean error of preconditioned GD, W ← W + (W* − W) Σ̂ A, after T steps, over a fixed set of prompts,
in float64 — no sampling noise, no float32, no product parameterisation, no curriculum.

The error of one prompt is (1/d)·tr(B Σ Bᵀ) with B = (I − Σ̂A)^T (E over W* ~ N(0, I/d) and
x_q ~ N(0, Σ) in closed form).  From A = 0.1·I, Adam with a cosine schedule; printed every `--every` steps: the
training mean, the mean and median on separate test prompts, and at the end PGD (c·Σ⁻¹) at a
few c.  The loss falls by decades here, and with β2 = 0.999 Adam's v remembers gradients 10–1000×
larger than the current ones: its steps shrink with the loss and training stalls.

  python scripts/adam_memory.py --b2=0.999
  python scripts/adam_memory.py --b2=0.95
  python scripts/adam_memory.py --b2=0.999 --eps=1e-20   # not ε: the same stall
  python scripts/adam_memory.py --b2=0.999 --log_loss    # log(mean): Adam sees O(1) gradients

Converged, it is also the best A for the mean in the model class (the construction's blocks): its
median against PGD's says what a mean-trained model can reach on the median (docs/learning.md).
"""
from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from loopicl.linear import baselines

flags.DEFINE_integer("d", 10, "input dimension")
flags.DEFINE_integer("n", 80, "in-context examples")
flags.DEFINE_float("kappa", 100.0, "κ_Σ (rotated Σ)")
flags.DEFINE_integer("loops", 20, "T")
flags.DEFINE_integer("prompts", 4096, "training prompts (full batch)")
flags.DEFINE_integer("test_prompts", 16384, "test prompts")
flags.DEFINE_integer("steps", 1001, "Adam steps")
flags.DEFINE_integer("every", 500, "print every this many steps")
flags.DEFINE_float("lr", 1e-2, "peak learning rate (cosine to 0)")
flags.DEFINE_float("b2", 0.999, "Adam β2")
flags.DEFINE_float("eps", 1e-8, "Adam ε")
flags.DEFINE_bool("log_loss", False, "minimise log(mean) instead of the mean")
flags.DEFINE_list("pgd_c", ["0.74", "0.76", "0.78", "0.80"], "PGD scales c printed at the end")
FLAGS = flags.FLAGS


def main(_):
  jax.config.update("jax_enable_x64", True)
  d, n, T = FLAGS.d, FLAGS.n, FLAGS.loops
  sigma, train, test, per_prompt = baselines.closed_form_study(
      d, n, FLAGS.kappa, T, FLAGS.prompts, FLAGS.test_prompts)  # per_prompt: [prompts]

  mean = lambda A: jnp.mean(per_prompt(A, train))
  objective = (lambda A: jnp.log(mean(A))) if FLAGS.log_loss else mean
  grad, train_mean, test_errors = jax.jit(jax.grad(objective)), jax.jit(mean), jax.jit(per_prompt)
  tx = optax.adam(optax.cosine_decay_schedule(FLAGS.lr, FLAGS.steps), b2=FLAGS.b2, eps=FLAGS.eps)
  A = 0.1 * jnp.eye(d)
  state = tx.init(A)
  for step in range(FLAGS.steps):
    if step % FLAGS.every == 0 or step == FLAGS.steps - 1:
      e = np.asarray(test_errors(A, test))
      print(f"step {step}: train mean {float(train_mean(A)):.3g}, test mean {e.mean():.3g}, "
            f"median {np.median(e):.3g}", flush=True)
    updates, state = tx.update(grad(A), state)
    A = A + updates
  sigma_inv = jnp.asarray(np.linalg.inv(sigma))
  for c in map(float, FLAGS.pgd_c):
    e = np.asarray(test_errors(c * sigma_inv, test))
    print(f"PGD c = {c}: test mean {e.mean():.3g}, median {np.median(e):.3g}")


if __name__ == "__main__":
  app.run(main)
