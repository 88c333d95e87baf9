"""loopicl: learn looped transformers in context and compare them with multi-step gradient descent."""
from loopicl import construction, tasks
from loopicl.model import LoopedLinearTransformer, loop_readouts

__all__ = ["LoopedLinearTransformer", "loop_readouts", "construction", "tasks"]
__version__ = "0.1.0"
