"""loopicl: learn looped transformers in context and compare them with multi-step gradient descent."""
from loopicl import construction, prng, tasks
from loopicl.model import LoopedLinearTransformer, loop_readouts

__all__ = ["LoopedLinearTransformer", "loop_readouts", "construction", "tasks"]
__version__ = "0.1.0"

prng.use_unrolled_threefry()  # same random bits, one fused kernel on the CPU (loopicl/prng.py)
