"""The reproduction grid (temporary: one module while it is being split)."""
from loopicl.experiments.reproduce.grid import *  # noqa: F401,F403
from loopicl.experiments.reproduce.grid import _experiment, _task  # noqa: F401
