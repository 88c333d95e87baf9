"""loopicl: learn looped transformers in context and compare them with multi-step gradient descent."""
from loopicl import prng
from loopicl.linear import construction, tasks, weights
from loopicl.linear.model import LoopedLinearTransformer, loop_readouts

__all__ = ["LoopedLinearTransformer", "loop_readouts", "construction", "tasks", "weights"]
__version__ = "0.1.0"

prng.use_unrolled_threefry()  # same random bits, one fused kernel on the CPU (loopicl/prng.py)
