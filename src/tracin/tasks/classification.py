"""Classification with cross-entropy: the default task, and the probabilities and label losses of a
classifier's checkpoints (used for predictions and as a mislabel baseline)."""
from __future__ import annotations

from typing import Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..checkpoints import Checkpoint
from ..errors import DataError
from .base import Batch, Task
from .hf import HFTask


class DefaultTask(Task):
    """What ``task=None`` means: cross-entropy classification of ``(inputs, labels)`` batches, and for dict batches
    (Hugging Face models and data) :class:`tracin.tasks.hf.HFTask` with its defaults."""

    def __init__(self):
        self.tuples, self.dicts = ClassificationTask(), HFTask()

    def _for(self, batch: Batch) -> Task:
        return self.dicts if isinstance(batch, Mapping) else self.tuples

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self._for(batch).loss(model, batch)

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        return self._for(batch).labels(batch)


class ClassificationTask(Task):
    """Batches are ``(inputs, labels)``; the loss is cross-entropy of ``model(inputs)``."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dim() != 1:
            kind = f"{labels.dtype} [{', '.join(map(str, labels.shape))}]" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise DataError(f"Classification labels must be a 1-D tensor of integer class indices, got {kind}; convert them "
                            "with labels.long(), or pass task= for another loss.")
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


def class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[...] the true class's logit less the logsumexp of the other logits; logits [..., classes], labels [...]
    (class indices, broadcast to the logits' leading shape)."""
    index = labels.expand(logits.shape[:-1]).unsqueeze(-1)
    return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1)


class MarginMeasurement(Task):
    """A measurement for test examples (``TracIn(..., measurement="margin")``): minus the classification margin, the
    true class's logit less the logsumexp of the other logits, for ``(inputs, labels)`` batches. Lower is better, as
    for a loss, so a positive score still means the training example helped: it raised the test example's margin."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"measurement='margin' reads (inputs, labels) batches, got a {type(batch).__name__}; pass a "
                            "callable measurement (model, batch) -> per-example values for other batches.")
        return -class_margin(model(batch[0]), batch[1])

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        return batch[1]


def predict_proba(model: torch.nn.Module, dataset, device: torch.device, batch_size: int, num_workers: int = 0) -> torch.Tensor:
    """Softmax class probabilities [N, classes] of ``model`` (eval mode) on an (input, label) dataset."""
    model.eval().to(device)
    with torch.no_grad():
        return torch.cat([torch.softmax(model(x.to(device)), dim=1).cpu()
                          for x, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)])


def checkpoint_probabilities(model: torch.nn.Module, checkpoints: Sequence[Checkpoint], dataset, device: torch.device,
                             batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Class probabilities [n, classes] under each checkpoint in turn (the model keeps the last one's weights)."""
    for ck in checkpoints:
        model.load_state_dict(ck.state_dict())
        yield predict_proba(model, dataset, device, batch_size, num_workers)


def label_losses(probs: torch.Tensor, labels: List[int]) -> np.ndarray:
    """Cross-entropy of each example's given label, [n] in float64. Summed over checkpoints it is a
    strong mislabel score (docs/quality.md)."""
    return F.nll_loss(probs.double().clamp_min(1e-300).log(), torch.tensor(labels), reduction="none").numpy()
