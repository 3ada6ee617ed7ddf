"""Tasks: how a batch becomes a per-example loss.

A task is anything with a ``loss(model, batch) -> Tensor[B]`` method (one loss value per example,
not reduced); :class:`Task` supplies the rest with defaults a subclass may override: moving a batch
to a device, counting its examples, labels, example ids, stratification keys, and a notice each
time a checkpoint's weights are loaded. A plain callable ``(model, batch) -> Tensor[B]`` is
accepted wherever a task is. docs/tasks.md is the guide to writing one.

The per-example loss must depend on that example alone (it does with the model in eval mode):
TracIn's gradients are those of ``loss[i]`` with respect to the parameters in scope.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import DataError

Batch = Any


def move_to(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [move_to(item, device) for item in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


def first_tensor(batch: Batch) -> Optional[torch.Tensor]:
    """The first tensor found in a (nested) batch, or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


class Task:
    """Base class for tasks; subclasses implement :meth:`loss`."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example losses, shape [B]."""
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """The batch with its tensors on ``device``."""
        return move_to(batch, device)

    def batch_size(self, batch: Batch) -> int:
        """Number of examples in the batch (the leading size of its first tensor)."""
        tensor = first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            raise TypeError("Cannot tell the batch size: the batch holds no tensor with a batch dimension.")
        return int(tensor.shape[0])

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        """Per-example labels [B] if the task has them (used for summaries and stratification)."""
        return None

    def ids(self, batch: Batch) -> Optional[Sequence[str]]:
        """Per-example ids (B strings) used to key outputs, or None for positions in the data set."""
        return None

    def strata(self, batch: Batch, key: str) -> Optional[torch.Tensor]:
        """Per-example stratification keys [B] for ``sample_rate`` with ``stratify_by=key``;
        the default knows ``"label"`` (:meth:`labels`). None means the task has no such key."""
        return self.labels(batch) if key == "label" else None

    def on_checkpoint(self, model: torch.nn.Module, index: int) -> None:
        """Called each time checkpoint ``index``'s weights are loaded into ``model`` (eval mode), before
        any loss at those weights; a task whose loss depends on checkpoint-level statistics sets them here."""


class ClassificationTask(Task):
    """Batches are ``(inputs, labels)``; the loss is cross-entropy of ``model(inputs)``."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        logits = model(inputs)
        classes = logits.shape[1] if logits.dim() > 1 else 1
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            bad = int(labels.max()) if int(labels.max()) >= classes else int(labels.min())
            raise DataError(
                f"Label {bad} is out of range for a model with {classes} outputs; labels must be 0..{classes - 1} "
                "(check the class folders or the label column)."
            )
        return F.cross_entropy(logits, labels, reduction="none")

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        return batch[1]


class CallableTask(Task):
    """Wraps a callable ``(model, batch) -> Tensor[B]`` as a task."""

    def __init__(self, fn: Callable[[torch.nn.Module, Batch], torch.Tensor]):
        self.fn = fn

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.fn(model, batch)


def as_task(task: Union[Task, Callable, None]) -> Task:
    """Normalise the ``task`` argument: None means classification with cross-entropy."""
    if task is None:
        return ClassificationTask()
    if isinstance(task, Task):
        return task
    if hasattr(task, "loss") and callable(task.loss):
        return task  # duck-typed task
    if callable(task):
        return CallableTask(task)
    raise TypeError(f"task must be a Task or a callable (model, batch) -> per-example loss, got {type(task).__name__}.")
