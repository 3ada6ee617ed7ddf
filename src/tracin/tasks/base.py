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

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import DataError

Batch = Any


def move_to(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [move_to(item, device) for item in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, Mapping):  # dicts, and Hugging Face's BatchEncoding
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


def slice_batch(batch: Batch, index: int, size: int) -> Batch:
    """``batch`` cut down to its example ``index`` (see :meth:`Task.example`)."""
    if isinstance(batch, torch.Tensor):
        return batch[index:index + 1] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):  # dicts, and Hugging Face's BatchEncoding
        return {k: slice_batch(v, index, size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == size and batch and not any(isinstance(x, (torch.Tensor, list, tuple, dict)) for x in batch):
            return type(batch)([batch[index]]) if not hasattr(batch, "_fields") else batch
        parts = [slice_batch(x, index, size) for x in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


def first_tensor(batch: Batch) -> Optional[torch.Tensor]:
    """The first tensor found in a (nested) batch, or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


class Task(ABC):
    """Base class for tasks; subclasses implement :meth:`loss`, the rest has defaults."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example losses, shape [B]."""

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """The batch with its tensors on ``device``."""
        return move_to(batch, device)

    def batch_size(self, batch: Batch) -> int:
        """Number of examples in the batch (the leading size of its first tensor)."""
        tensor = first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            raise DataError(f"Cannot tell the batch size of a {type(batch).__name__} batch: it holds no tensor with a batch "
                            "dimension; yield tensors from the dataset, or give the task a batch_size(batch) method.")
        return int(tensor.shape[0])

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        """Per-example labels [B] if the task has them (used for summaries and stratification)."""
        return None

    def example(self, batch: Batch, index: int) -> Batch:
        """A batch holding example ``index`` of ``batch`` alone (for the exact per-example fallback): every tensor
        and every list or tuple of non-tensors whose leading size is the batch size is sliced; the rest is kept."""
        return slice_batch(batch, index, self.batch_size(batch))

    def strata(self, batch: Batch, key: str) -> Optional[torch.Tensor]:
        """Per-example stratification keys [B] for ``sample_rate`` with ``stratify_by=key``;
        the default knows ``"label"`` (:meth:`labels`). None means the task has no such key."""
        return self.labels(batch) if key == "label" else None

    def on_checkpoint(self, model: torch.nn.Module, index: int) -> None:
        """Called each time checkpoint ``index``'s weights are loaded into ``model`` (eval mode), before
        any loss at those weights; a task whose loss depends on checkpoint-level statistics sets them here."""


class CallableTask(Task):
    """Wraps a callable ``(model, batch) -> Tensor[B]`` as a task."""

    def __init__(self, fn: Callable[[torch.nn.Module, Batch], torch.Tensor]):
        self.fn = fn

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.fn(model, batch)


class DuckTask(Task):
    """Wraps any object with a ``loss(model, batch)`` method as a task: each of :class:`Task`'s other
    methods is the object's own where it has one, else the default."""

    _OPTIONAL = ("to_device", "batch_size", "labels", "strata", "on_checkpoint", "example")

    def __init__(self, inner: Any):
        self.inner = inner
        for name in self._OPTIONAL:
            own = getattr(inner, name, None)
            if callable(own):
                setattr(self, name, own)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.inner.loss(model, batch)
