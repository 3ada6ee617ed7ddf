"""Tasks: how a batch becomes a per-example loss (:class:`Task`), and the tasks that ship:
classification (the default), pairwise ranking (:mod:`tracin.tasks.ranking`) and PyKEEN knowledge-graph
embeddings (:mod:`tracin.tasks.kge`), each with its own trainer."""
from .arguments import as_measurement, as_task
from .base import Batch, CallableTask, Task, first_tensor, move_to, slice_batch
from .classification import ClassificationTask, DefaultTask
from .hf import HFTask

__all__ = ["Batch", "Task", "ClassificationTask", "DefaultTask", "HFTask", "CallableTask", "as_task", "as_measurement", "first_tensor", "move_to", "slice_batch"]
