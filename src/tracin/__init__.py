"""tracin: TracIn training-data influence for PyTorch.

>>> from tracin import TracIn, Checkpoint
"""
from .api import TracIn
from .checkpoints import Checkpoint, save_checkpoint
from .errors import CheckpointError, DataError, TracInError, UnsupportedModuleError
from .results import InfluenceResult, TopK
from .tasks import CallableTask, ClassificationTask, Task
from .version import __version__  # noqa: F401 - tracin.__version__


__all__ = [
    "TracIn", "Checkpoint", "save_checkpoint", "Task", "ClassificationTask", "CallableTask",
    "InfluenceResult", "TopK", "TracInError", "CheckpointError", "DataError", "UnsupportedModuleError",
]
