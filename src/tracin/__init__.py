"""tracin: TracIn training-data influence for PyTorch.

>>> from tracin import TracIn, Checkpoint

The names below are imported when first used (PEP 562), so ``tracin --help`` and other commands that never score do
not wait for PyTorch to load.
"""
from importlib import import_module
from typing import Any

from .errors import CheckpointError, DataError, TracInError, UnsupportedModuleError
from .version import __version__  # noqa: F401 - tracin.__version__

_LAZY = {"TracIn": "api", "Checkpoint": "checkpoints", "save_checkpoint": "checkpoints", "InfluenceResult": "results",
         "TopK": "results", "InRun": "engine.inrun", "InRunTrainer": "engine.hf_trainer", "Indexed": "engine.loaders", "Task": "tasks", "CallableTask": "tasks", "ClassificationTask": "tasks"}

__all__ = [
    "TracIn", "InRun", "Indexed", "Checkpoint", "save_checkpoint", "Task", "ClassificationTask", "CallableTask",
    "InfluenceResult", "TopK", "TracInError", "CheckpointError", "DataError", "UnsupportedModuleError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tracin' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
