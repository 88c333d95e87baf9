"""The quick reproduction grid: the paper's regime at d = 10 in under 5 minutes on a 2-core CPU.

Linear regression, d = 10, n/d ∈ {1, 1.5, 2, 4, 8}, κ_Σ = 1: the five step rules of the GD
construction (tuned η on 65 536 prompts, validated on 65 536 others; η = 1/λ₊; η = 2/(λ₋+λ₊); each prompt's
oracle η_i; c·Σ⁻¹) in closed form at T up to 200, and at n/d ∈ {2, 8} a model trained from random
init at T = 20 (the default recipe, window mode: configs/reproduce.py) read at T ≤ 20, all on the same 2 seeds ×
2048 held-out prompts; the cheap reference rungs (CG, Chebyshev, Newton–Schulz) at T ≤ 20.

  python scripts/reproduce.py --config configs/reproduce_quick.py --workdir runs/reproduce_quick
"""
from configs import reproduce


def get_config():
  config = reproduce.get_config()
  g = config.grid
  g.kinds = ("linear_regression",)
  g.ds = g.trained_ds = (10,)
  g.n_over_d = (1.0, 1.5, 2.0, 4.0, 8.0)
  g.condition_numbers = (1.0,)
  g.noise_stds = ()
  g.loops = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200)
  g.trained_loops = (1, 2, 3, 5, 7, 10, 15, 20)
  g.weight_loops = ()
  g.fixed_loops = 10
  g.fixed_n_over_d = 4.0
  g.ladder = ("cg", "chebyshev", "newton", "gdpp")  # GD++ (γ, η tuned jointly): ~4 s per seed and
                                            # setting; whitened GD's fit ~5 s (left out)
  g.seeds = (0, 1)                          # 2 seeds (one per host CPU device): half the training
  g.trained_n_over_d = (2.0, 8.0)           # trained models at two n/d (~55 s each for 2 seeds)
  return config
